//! A bzip2 encoder (level 9 streams, `BZh9`): the image builder's hot path. libbz2 spends most of
//! its time in its block sort; here the Burrows-Wheeler transform is a suffix sort (libsais) of the
//! block turned to its least rotation, whose suffix order is the order of the block's cyclic
//! rotations. The entropy stage follows libbz2's (`compress.c`): MTF with RUNA/RUNB zero runs, 2 to
//! 6 Huffman tables chosen per 50 symbols, lengths at most 17 bits; with lbzip2's eight refinement
//! passes (libbz2 makes four) and tables ordered by first use, so that it is no larger than lbzip2's.
//!
//! A crate of its own, beside the decoder `opq-bunzip`, so that test builds compile it optimised
//! (Cargo.toml's `profile.dev.package`) and the fuzz target can round-trip through both.

/// Bytes a block holds after the first run-length pass: libbz2's limit at level 9, which leaves
/// room under the format's 900 000 for the last run's five bytes.
pub const BLOCK_MAX: usize = 100_000 * 9 - 19;

const BLOCK_MAGIC: u64 = 0x3141_5926_5359;
const END_MAGIC: u64 = 0x1772_4538_5090;
const GROUP_SIZE: usize = 50;
const MAX_GROUPS: usize = 6;
const MAX_ALPHA: usize = 258;
const MAX_CODE_LEN: u8 = 17;
const ITERATIONS: usize = 8;

const BZIP2_CRC: crc::Crc<u32, crc::Table<16>> =
    crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_BZIP2);

/// `data` as one complete bzip2 stream at level 9: the header, as many blocks as the data needs
/// (one for up to about 899 000 bytes), the stream CRC. Any input length, the empty one included.
pub fn compress_block(data: &[u8]) -> Vec<u8> {
    let mut w = BitWriter::with_capacity(data.len() / 3 + 64);
    w.put(32, u64::from(u32::from_be_bytes(*b"BZh9")));
    let mut combined = 0u32;
    WORK.with_borrow_mut(|work| {
        let mut pos = 0;
        while pos < data.len() {
            let used = rle1(&data[pos..], &mut work.block);
            let crc = BZIP2_CRC.checksum(&data[pos..pos + used]);
            combined = combined.rotate_left(1) ^ crc;
            let block = std::mem::take(&mut work.block);
            encode_block(&block, crc, work, &mut w);
            work.block = block;
            pos += used;
        }
    });
    w.put(48, END_MAGIC);
    w.put(32, u64::from(combined));
    w.finish()
}

/// The first run-length pass: runs of 4 to 255 equal bytes become the 4 bytes and a count of the
/// rest. Fills `block` (cleared first) up to `BLOCK_MAX` and returns how many input bytes it took.
/// Runs never cross a block boundary: decoders reset their run state at each block.
fn rle1(input: &[u8], block: &mut Vec<u8>) -> usize {
    block.clear();
    let mut i = 0;
    while i < input.len() && block.len() < BLOCK_MAX {
        // The bytes up to the next run of four are copied as they are, as many as there is room for.
        let limit = input.len().min(i + (BLOCK_MAX - block.len()));
        let mut j = i;
        while j + 3 < limit
            && !(input[j] == input[j + 1] && input[j] == input[j + 2] && input[j] == input[j + 3])
        {
            j += 1;
        }
        if j + 3 >= limit {
            j = limit;
        }
        block.extend_from_slice(&input[i..j]);
        i = j;
        if i == limit {
            continue;
        }
        let b = input[i];
        let end = input.len().min(i + 255);
        let mut run = 4;
        while i + run < end && input[i + run] == b {
            run += 1;
        }
        block.extend_from_slice(&[b, b, b, b, (run - 4) as u8]);
        i += run;
    }
    i
}

thread_local! {
    /// Each thread's buffers, kept from block to block (about 8 MiB): a fresh set per block cost
    /// a page fault for every 4 KiB of them.
    static WORK: std::cell::RefCell<Work> = std::cell::RefCell::new(Work::default());
}

/// Buffers reused from block to block.
#[derive(Default)]
struct Work {
    block: Vec<u8>,
    twice: Vec<u8>,
    candidates: Vec<u32>,
    sa: Vec<i32>,
    bwt: Vec<u8>,
    mtfv: Vec<u16>,
}

fn encode_block(block: &[u8], crc: u32, work: &mut Work, w: &mut BitWriter) {
    let orig_ptr = bwt(block, work);
    let mut in_use = [false; 256];
    for &b in block {
        in_use[b as usize] = true;
    }
    let n_in_use = in_use.iter().filter(|&&u| u).count();
    let alpha_size = n_in_use + 2;
    let mut freq = [0u32; MAX_ALPHA];
    mtf_rle2(&work.bwt, &in_use, &mut work.mtfv, &mut freq[..alpha_size]);

    w.put(48, BLOCK_MAGIC);
    w.put(32, u64::from(crc));
    w.put(1, 0); // never randomised
    w.put(24, orig_ptr as u64);
    let mut used16 = 0u16;
    for (i, chunk) in in_use.chunks(16).enumerate() {
        if chunk.iter().any(|&u| u) {
            used16 |= 0x8000 >> i;
        }
    }
    w.put(16, u64::from(used16));
    for chunk in in_use.chunks(16) {
        if chunk.iter().any(|&u| u) {
            let bits = chunk
                .iter()
                .enumerate()
                .fold(0u64, |acc, (j, &u)| acc | (u64::from(u) << (15 - j)));
            w.put(16, bits);
        }
    }
    send_mtf_values(&work.mtfv, &freq[..alpha_size], w);
}

/// The block sort: the Burrows-Wheeler transform of `block` over its cyclic rotations into
/// `work.bwt`; returns the row of the block itself (origPtr).
///
/// Turned to its least rotation, a block that is not periodic is a Lyndon word, and a Lyndon
/// word's suffixes sort in the order of its rotations (when one suffix is a prefix of another, the
/// rotation that continues with the word's start is the smaller, as is the shorter suffix). A
/// periodic block is the power of a Lyndon word: its equal rotations tie, their last bytes are the
/// same, and any of their rows decodes to the block, so the suffix order serves there too.
fn bwt(block: &[u8], work: &mut Work) -> usize {
    let n = block.len();
    // The block twice: every rotation is a slice of it.
    let twice = &mut work.twice;
    twice.clear();
    twice.extend_from_slice(block);
    twice.extend_from_slice(block);
    let k = least_rotation(twice, n, &mut work.candidates);
    let text = &twice[k..k + n];
    // libsais writes every entry: no clearing, only growth.
    work.sa.resize(n, 0);
    suffix_sort(text, &mut work.sa);
    // The block starts at n - k in the rotated text.
    let start = ((n - k) % n) as i32;
    let mut orig_ptr = 0;
    work.bwt.clear();
    work.bwt.reserve(n);
    for (row, &s) in work.sa.iter().enumerate() {
        if s == start {
            orig_ptr = row;
        }
        // The byte before the text's start is its last.
        let prev = if s == 0 {
            k + n - 1
        } else {
            k + s as usize - 1
        };
        work.bwt.push(twice[prev]);
    }
    orig_ptr
}

/// The suffix array of `text` into `sa` (of the same length), by libsais.
fn suffix_sort(text: &[u8], sa: &mut [i32]) {
    let n = i32::try_from(text.len()).expect("blocks are under 2 GiB");
    // SAFETY: `text` and `sa` are live, both of n elements; fs = 0 asks for no extra room, and a
    // null freq for no symbol counts.
    let rc = unsafe {
        libsais_sys::libsais::libsais(text.as_ptr(), sa.as_mut_ptr(), n, 0, std::ptr::null_mut())
    };
    assert_eq!(rc, 0, "libsais failed on a block of {n} bytes");
}

/// Where the lexicographically least rotation of the block starts (the first such), given the
/// block twice over in `twice`, of which `n` is the block's length, and a list to reuse.
///
/// The two-candidate scan of Shiloach / Duval in linear time, run only over the candidates: the
/// positions whose next eight bytes are the least eight-byte string in the block (one pass finds
/// them). On text and binaries those are few, and the scan's unpredictable comparisons with them.
fn least_rotation(twice: &[u8], n: usize, candidates: &mut Vec<u32>) -> usize {
    candidates.clear();
    if n < 8 {
        candidates.extend(0..n as u32);
    } else {
        let mut least = u64::MAX;
        for (p, w) in twice[..n + 7].windows(8).enumerate() {
            let w = u64::from_be_bytes(w.try_into().expect("8 bytes"));
            if w <= least {
                if w < least {
                    least = w;
                    candidates.clear();
                }
                candidates.push(p as u32);
            }
        }
    }
    // Each of the two candidates moves forward only, with its own cursor into the list.
    let next = |cursor: &mut usize, p: usize| -> usize {
        while *cursor < candidates.len() && (candidates[*cursor] as usize) < p {
            *cursor += 1;
        }
        candidates.get(*cursor).map_or(n, |&c| c as usize)
    };
    let (mut ci, mut cj) = (0, 0);
    let mut i = next(&mut ci, 0);
    let mut j = next(&mut cj, i + 1);
    while i < n && j < n {
        let k = common_prefix(&twice[i..i + n], &twice[j..j + n]);
        if k >= n {
            break; // periodic: equal rotations
        }
        // The loser at offset k loses with its next k positions too.
        if twice[i + k] > twice[j + k] {
            i = next(&mut ci, i + k + 1);
        } else {
            j = next(&mut cj, j + k + 1);
        }
        if i == j {
            j = next(&mut cj, j + 1);
        }
    }
    i.min(j)
}

/// How many leading bytes `a` and `b` share (up to the shorter's length).
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let len = a.len().min(b.len());
    let mut p = 0;
    while p + 8 <= len {
        let x = u64::from_le_bytes(a[p..p + 8].try_into().expect("8 bytes"));
        let y = u64::from_le_bytes(b[p..p + 8].try_into().expect("8 bytes"));
        if x != y {
            return p + ((x ^ y).trailing_zeros() / 8) as usize;
        }
        p += 8;
    }
    while p < len && a[p] == b[p] {
        p += 1;
    }
    p
}

/// Move-to-front over the bytes in use, with runs of zeros written in bijective base 2 as RUNA (0)
/// and RUNB (1); other positions `p` become `p + 1`, and the block ends with EOB. Counts each
/// symbol into `freq`.
fn mtf_rle2(bwt: &[u8], in_use: &[bool; 256], out: &mut Vec<u16>, freq: &mut [u32]) {
    let mut unseq_to_seq = [0u8; 256];
    let mut order = [0u8; 256];
    let mut n = 0usize;
    for b in 0..256 {
        if in_use[b] {
            unseq_to_seq[b] = n as u8;
            order[n] = n as u8;
            n += 1;
        }
    }
    let eob = (n + 1) as u16;
    out.clear();
    out.reserve(bwt.len() + 1);
    let mut zeros = 0u32;
    let flush_zeros = |zeros: &mut u32, out: &mut Vec<u16>, freq: &mut [u32]| {
        let mut z = *zeros - 1;
        loop {
            let sym = (z & 1) as u16;
            out.push(sym);
            freq[sym as usize] += 1;
            if z < 2 {
                break;
            }
            z = (z - 2) / 2;
        }
        *zeros = 0;
    };
    for &b in bwt {
        let c = unseq_to_seq[b as usize];
        if order[0] == c {
            zeros += 1;
            continue;
        }
        if zeros > 0 {
            flush_zeros(&mut zeros, out, freq);
        }
        let j = if order[1] == c {
            1
        } else {
            position_of(&order, c)
        };
        if j < 16 {
            // The list's head in one register: bytes 0..j move up one, c goes in front.
            let head = u128::from_le_bytes(order[..16].try_into().expect("16 bytes"));
            let moved = u128::MAX >> (8 * (15 - j));
            let head = ((head << 8) & moved) | (head & !moved) | u128::from(c);
            order[..16].copy_from_slice(&head.to_le_bytes());
        } else {
            order.copy_within(0..j, 1);
            order[0] = c;
        }
        out.push(j as u16 + 1);
        freq[j + 1] += 1;
    }
    if zeros > 0 {
        flush_zeros(&mut zeros, out, freq);
    }
    out.push(eob);
    freq[eob as usize] += 1;
}

/// Where `c` is in `order` (it is there), eight bytes at a time: a byte equal to `c` is a zero
/// byte of the word XOR `c`s, and the lowest zero byte is found exactly.
fn position_of(order: &[u8; 256], c: u8) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    for (q, word) in order.chunks_exact(8).enumerate() {
        let x = u64::from_le_bytes(word.try_into().expect("8 bytes")) ^ (ONES * u64::from(c));
        let zero = x.wrapping_sub(ONES) & !x & (ONES << 7);
        if zero != 0 {
            return q * 8 + (zero.trailing_zeros() / 8) as usize;
        }
    }
    unreachable!("a byte in use is in the MTF list")
}

/// Chooses the Huffman tables and codes the symbols, as libbz2's `sendMTFValues` does: an initial
/// split of the alphabet into equal-frequency ranges, then passes that give each group of 50
/// symbols its cheapest table and rebuild every table from the symbols it got. Eight passes, as
/// lbzip2 makes, not libbz2's four: 0.04 % smaller on the bench payload, for about 2 % more time.
fn send_mtf_values(mtfv: &[u16], freq: &[u32], w: &mut BitWriter) {
    let alpha_size = freq.len();
    let n_mtf = mtfv.len();
    let n_groups = match n_mtf {
        0..200 => 2,
        200..600 => 3,
        600..1200 => 4,
        1200..2400 => 5,
        _ => 6,
    };
    const LESSER: u8 = 0;
    const GREATER: u8 = 15;
    let mut len = [[GREATER; MAX_ALPHA]; MAX_GROUPS];
    {
        let mut n_part = n_groups;
        let mut rem_f = n_mtf as i64;
        let mut gs = 0i64;
        while n_part > 0 {
            let t_freq = rem_f / n_part as i64;
            let mut ge = gs - 1;
            let mut a_freq = 0i64;
            while a_freq < t_freq && ge < alpha_size as i64 - 1 {
                ge += 1;
                a_freq += i64::from(freq[ge as usize]);
            }
            if ge > gs && n_part != n_groups && n_part != 1 && (n_groups - n_part) % 2 == 1 {
                a_freq -= i64::from(freq[ge as usize]);
                ge -= 1;
            }
            for (v, l) in len[n_part - 1][..alpha_size].iter_mut().enumerate() {
                let v = v as i64;
                *l = if v >= gs && v <= ge { LESSER } else { GREATER };
            }
            n_part -= 1;
            gs = ge + 1;
            rem_f -= a_freq;
        }
    }

    let n_selectors = n_mtf.div_ceil(GROUP_SIZE);
    let mut selectors = vec![0u8; n_selectors];
    // 512 entries, a symbol masked to 9 bits: indexing then needs no bounds check.
    let mut rfreq = [[0u32; 512]; MAX_GROUPS];
    for iteration in 0..ITERATIONS {
        let mut changed = iteration == 0;
        for f in rfreq.iter_mut() {
            f.fill(0);
        }
        // Every table's cost of a symbol in one word, 10 bits each: 50 symbols of at most 17 bits
        // add up to 850, so the fields never carry into each other.
        let mut packed = [0u64; 512];
        for (v, p) in packed[..alpha_size].iter_mut().enumerate() {
            *p = (0..n_groups).fold(0u64, |acc, t| acc | (u64::from(len[t][v]) << (10 * t)));
        }
        for (group, sel) in mtfv.chunks(GROUP_SIZE).zip(selectors.iter_mut()) {
            let sum: u64 = group.iter().map(|&s| packed[s as usize & 511]).sum();
            let mut best = u32::MAX;
            let mut bt = 0;
            for t in 0..n_groups {
                let cost = ((sum >> (10 * t)) & 0x3ff) as u32;
                if cost < best {
                    best = cost;
                    bt = t;
                }
            }
            changed |= *sel != bt as u8;
            *sel = bt as u8;
            let rf = &mut rfreq[bt];
            for &s in group {
                rf[s as usize & 511] += 1;
            }
        }
        if !changed {
            break; // the same choices would rebuild the same tables: settled
        }
        for t in 0..n_groups {
            make_code_lengths(
                &mut len[t][..alpha_size],
                &rfreq[t][..alpha_size],
                MAX_CODE_LEN,
            );
        }
    }

    // Tables in the order of their first use, which keeps the selectors' MTF codes short, and
    // those no group chose left out (as lbzip2 does); the format wants at least two.
    let mut order = Vec::with_capacity(MAX_GROUPS);
    for &s in &selectors {
        if !order.contains(&s) {
            order.push(s);
            if order.len() == n_groups {
                break;
            }
        }
    }
    for t in 0..n_groups as u8 {
        if order.len() < 2 && !order.contains(&t) {
            order.push(t);
        }
    }
    let mut new_index = [0u8; MAX_GROUPS];
    for (new, &old) in order.iter().enumerate() {
        new_index[old as usize] = new as u8;
    }
    for s in &mut selectors {
        *s = new_index[*s as usize];
    }
    let len: Vec<[u8; MAX_ALPHA]> = order.iter().map(|&old| len[old as usize]).collect();
    let n_groups = order.len();

    let mut codes = [[0u32; MAX_ALPHA]; MAX_GROUPS];
    for t in 0..n_groups {
        assign_codes(&mut codes[t][..alpha_size], &len[t][..alpha_size]);
    }

    w.put(3, n_groups as u64);
    w.put(15, n_selectors as u64);
    let mut pos: [u8; MAX_GROUPS] = [0, 1, 2, 3, 4, 5];
    for &s in &selectors {
        let j = pos.iter().position(|&p| p == s).expect("selector in range");
        pos.copy_within(0..j, 1);
        pos[0] = s;
        // j ones and a zero.
        w.put(j as u32 + 1, ((1u64 << j) - 1) << 1);
    }
    for lens in &len[..n_groups] {
        let mut curr = lens[0];
        w.put(5, u64::from(curr));
        for &l in &lens[..alpha_size] {
            while curr < l {
                w.put(2, 2);
                curr += 1;
            }
            while curr > l {
                w.put(2, 3);
                curr -= 1;
            }
            w.put(1, 0);
        }
    }
    for (group, &sel) in mtfv.chunks(GROUP_SIZE).zip(&selectors) {
        let (l, c) = (&len[sel as usize], &codes[sel as usize]);
        for &s in group {
            w.put(u32::from(l[s as usize]), u64::from(c[s as usize]));
        }
    }
}

/// Huffman code lengths for `freq` (a zero counts as one) of at most `max_len` bits, as libbz2's
/// `BZ2_hbMakeCodeLengths` builds them: a heap of weights whose low byte carries the subtree's depth,
/// so that ties go to the shallower tree; when a code is too long the weights are halved and the
/// tree rebuilt.
fn make_code_lengths(len: &mut [u8], freq: &[u32], max_len: u8) {
    let alpha_size = freq.len();
    let mut heap = [0usize; MAX_ALPHA + 2];
    let mut weight = [0u32; MAX_ALPHA * 2];
    let mut parent = [0i32; MAX_ALPHA * 2];
    for (i, &f) in freq.iter().enumerate() {
        weight[i + 1] = f.max(1) << 8;
    }
    let add_weights =
        |a: u32, b: u32| ((a & 0xffff_ff00) + (b & 0xffff_ff00)) | (1 + (a & 0xff).max(b & 0xff));
    loop {
        let mut n_nodes = alpha_size;
        let mut n_heap = 0usize;
        heap[0] = 0;
        weight[0] = 0;
        parent[0] = -2;
        parent[1..=alpha_size].fill(-1);
        for i in 1..=alpha_size {
            n_heap += 1;
            heap[n_heap] = i;
            up_heap(&mut heap, &weight, n_heap);
        }
        while n_heap > 1 {
            let n1 = heap[1];
            heap[1] = heap[n_heap];
            n_heap -= 1;
            down_heap(&mut heap, &weight, n_heap, 1);
            let n2 = heap[1];
            heap[1] = heap[n_heap];
            n_heap -= 1;
            down_heap(&mut heap, &weight, n_heap, 1);
            n_nodes += 1;
            parent[n1] = n_nodes as i32;
            parent[n2] = n_nodes as i32;
            weight[n_nodes] = add_weights(weight[n1], weight[n2]);
            parent[n_nodes] = -1;
            n_heap += 1;
            heap[n_heap] = n_nodes;
            up_heap(&mut heap, &weight, n_heap);
        }
        let mut too_long = false;
        for i in 1..=alpha_size {
            let mut depth = 0u8;
            let mut k = i;
            while parent[k] >= 0 {
                k = parent[k] as usize;
                depth += 1;
            }
            len[i - 1] = depth;
            too_long |= depth > max_len;
        }
        if !too_long {
            return;
        }
        for w in &mut weight[1..=alpha_size] {
            *w = (1 + (*w >> 8) / 2) << 8;
        }
    }
}

fn up_heap(heap: &mut [usize], weight: &[u32], mut z: usize) {
    let tmp = heap[z];
    while weight[tmp] < weight[heap[z >> 1]] {
        heap[z] = heap[z >> 1];
        z >>= 1;
    }
    heap[z] = tmp;
}

fn down_heap(heap: &mut [usize], weight: &[u32], n_heap: usize, mut z: usize) {
    let tmp = heap[z];
    loop {
        let mut y = z << 1;
        if y > n_heap {
            break;
        }
        if y < n_heap && weight[heap[y + 1]] < weight[heap[y]] {
            y += 1;
        }
        if weight[tmp] < weight[heap[y]] {
            break;
        }
        heap[z] = heap[y];
        z = y;
    }
    heap[z] = tmp;
}

/// Canonical codes, as decoders rebuild them from the lengths: by length, then by symbol.
fn assign_codes(codes: &mut [u32], len: &[u8]) {
    let mut code = 0u32;
    for l in 1..=MAX_CODE_LEN {
        for (c, &sl) in codes.iter_mut().zip(len) {
            if sl == l {
                *c = code;
                code += 1;
            }
        }
        code <<= 1;
    }
}

/// Bits written most significant first, as bzip2 reads them.
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    bits: u32,
}

impl BitWriter {
    fn with_capacity(n: usize) -> Self {
        BitWriter {
            out: Vec::with_capacity(n),
            acc: 0,
            bits: 0,
        }
    }

    /// The low `n` bits of `v` (n ≤ 48).
    #[inline]
    fn put(&mut self, n: u32, v: u64) {
        debug_assert!(n <= 48 && (n == 64 || v >> n == 0));
        self.acc = (self.acc << n) | v;
        self.bits += n;
        while self.bits >= 8 {
            self.bits -= 8;
            self.out.push((self.acc >> self.bits) as u8);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.bits > 0 {
            self.out.push((self.acc << (8 - self.bits)) as u8);
        }
        self.out
    }
}
