//! A bzip2 decoder for one whole stream held in memory: the box's hot path when it unpacks an
//! image. Profiling the C and Rust libbz2 showed three quarters of the time in one load: the walk
//! through the Burrows-Wheeler inverse, one cache miss after another. Here the walk runs from both
//! ends of the block at once (forward from the original row, backward through the LF mapping), so
//! two misses are in flight instead of one; Huffman symbols come from a lookup table. Blocks in the
//! old "randomised" format are not handled: the caller decodes such a stream with libbz2.
//!
//! A crate of its own so that test builds, whose box-updater the virtual box runs under emulation,
//! compile it optimised (Cargo.toml's `profile.dev.package`), as they do libbz2.

use std::fmt;

const BLOCK_MAGIC: u64 = 0x3141_5926_5359;
const END_MAGIC: u64 = 0x1772_4538_5090;
const GROUP_SIZE: usize = 50;
const MAX_GROUPS: usize = 6;
const MAX_ALPHA: usize = 258;
const MAX_SELECTORS: usize = 18_002;
const MAX_CODE_LEN: usize = 20;
/// Huffman codes up to this long are decoded with one table lookup.
const FAST_BITS: u32 = 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The data is not valid bzip2 (the reason is for the message).
    Corrupt(&'static str),
    /// The stream inflates past the caller's bound.
    TooLarge,
    /// A valid but obsolete form (randomised blocks) this decoder leaves to libbz2.
    Unsupported,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Corrupt(why) => write!(f, "bzip2 data is corrupt: {why}"),
            Error::TooLarge => write!(f, "bzip2 stream inflates past the bound"),
            Error::Unsupported => write!(f, "bzip2 stream uses randomised blocks"),
        }
    }
}

impl std::error::Error for Error {}

type Result<T> = std::result::Result<T, Error>;

/// Reads bits most significant first; past the end of the data it reads zeros and remembers it.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    buf: u64,
    /// Valid bits at the top of `buf`.
    n: u32,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8]) -> Self {
        Bits {
            data,
            pos: 0,
            buf: 0,
            n: 0,
        }
    }

    /// Fills `buf` to at least 57 bits.
    #[inline]
    fn refill(&mut self) {
        if let Some(word) = self.data.get(self.pos..self.pos + 8) {
            let w = u64::from_be_bytes(word.try_into().expect("eight bytes"));
            // The bits below the whole bytes taken are the stream's next bits too, so ORing them
            // in again at the next refill changes nothing.
            self.buf |= w >> self.n;
            let take = (63 - self.n) >> 3;
            self.pos += take as usize;
            self.n += take * 8;
        } else {
            while self.n <= 56 {
                let b = self.data.get(self.pos).copied().unwrap_or(0);
                self.pos += 1;
                self.buf |= (b as u64) << (56 - self.n);
                self.n += 8;
            }
        }
    }

    #[inline]
    fn get(&mut self, k: u32) -> u32 {
        debug_assert!((1..=32).contains(&k));
        if self.n < k {
            self.refill();
        }
        let v = (self.buf >> (64 - k)) as u32;
        self.buf <<= k;
        self.n -= k;
        v
    }

    #[inline]
    fn bit(&mut self) -> bool {
        self.get(1) == 1
    }

    /// Bits consumed so far.
    fn consumed_bits(&self) -> u64 {
        self.pos as u64 * 8 - self.n as u64
    }

    fn overrun(&self) -> bool {
        self.consumed_bits() > self.data.len() as u64 * 8
    }
}

/// One Huffman table, decoded the way libbz2 does (limit, base, perm), with a lookup table in
/// front for the short codes.
struct Table {
    min_len: u32,
    limit: [i32; MAX_CODE_LEN + 2],
    base: [i32; MAX_CODE_LEN + 2],
    perm: [u16; MAX_ALPHA],
    perm_len: usize,
    /// For each FAST_BITS-bit prefix: symbol << 5 | code length, or 0 when the code is longer.
    fast: [u16; 1 << FAST_BITS],
}

impl Table {
    fn new() -> Self {
        Table {
            min_len: 0,
            limit: [0; MAX_CODE_LEN + 2],
            base: [0; MAX_CODE_LEN + 2],
            perm: [0; MAX_ALPHA],
            perm_len: 0,
            fast: [0; 1 << FAST_BITS],
        }
    }

    fn build(&mut self, lengths: &[u8]) {
        let min_len = *lengths.iter().min().expect("alphabet is never empty") as usize;
        let max_len = *lengths.iter().max().expect("alphabet is never empty") as usize;
        let mut pp = 0;
        for len in min_len..=max_len {
            for (sym, &l) in lengths.iter().enumerate() {
                if l as usize == len {
                    self.perm[pp] = sym as u16;
                    pp += 1;
                }
            }
        }
        self.perm_len = pp;
        let mut base = [0i32; MAX_CODE_LEN + 3];
        for &l in lengths {
            base[l as usize + 1] += 1;
        }
        for i in 1..base.len() {
            base[i] += base[i - 1];
        }
        self.limit = [0; MAX_CODE_LEN + 2];
        let mut vec = 0i32;
        for i in min_len..=max_len {
            vec += base[i + 1] - base[i];
            self.limit[i] = vec - 1;
            vec <<= 1;
        }
        for (i, b) in base
            .iter_mut()
            .enumerate()
            .take(max_len + 1)
            .skip(min_len + 1)
        {
            *b = ((self.limit[i - 1] + 1) << 1) - *b;
        }
        self.base.copy_from_slice(&base[..MAX_CODE_LEN + 2]);
        self.min_len = min_len as u32;
        // Every prefix that resolves within FAST_BITS bits gets its answer in the table.
        for (prefix, slot) in self.fast.iter_mut().enumerate() {
            *slot = 0;
            let mut zn = min_len;
            if zn > FAST_BITS as usize {
                continue;
            }
            let mut zvec = (prefix >> (FAST_BITS as usize - zn)) as i32;
            loop {
                if zvec <= self.limit[zn] {
                    let idx = zvec - self.base[zn];
                    if idx >= 0 && (idx as usize) < pp {
                        *slot = (self.perm[idx as usize] << 5) | zn as u16;
                    }
                    break;
                }
                zn += 1;
                if zn > FAST_BITS as usize {
                    break;
                }
                zvec = (zvec << 1) | ((prefix >> (FAST_BITS as usize - zn)) & 1) as i32;
            }
        }
    }

    #[inline(always)]
    fn decode(&self, br: &mut Bits) -> Result<usize> {
        if br.n < MAX_CODE_LEN as u32 {
            br.refill();
        }
        let e = self.fast[(br.buf >> (64 - FAST_BITS)) as usize];
        if e != 0 {
            let len = (e & 31) as u32;
            br.buf <<= len;
            br.n -= len;
            return Ok((e >> 5) as usize);
        }
        self.decode_long(br)
    }

    /// A long code (or garbage): bit by bit, as libbz2 does. Out of line, so that the fast path
    /// above stays small enough to inline into the symbol loop.
    #[cold]
    #[inline(never)]
    fn decode_long(&self, br: &mut Bits) -> Result<usize> {
        let mut zn = self.min_len as usize;
        let mut zvec = br.get(zn as u32) as i32;
        loop {
            if zn > MAX_CODE_LEN {
                return Err(Error::Corrupt("bad Huffman code"));
            }
            if zvec <= self.limit[zn] {
                break;
            }
            zn += 1;
            zvec = (zvec << 1) | br.get(1) as i32;
        }
        let idx = zvec - self.base[zn];
        if idx < 0 || idx as usize >= self.perm_len {
            return Err(Error::Corrupt("bad Huffman code"));
        }
        Ok(self.perm[idx as usize] as usize)
    }
}

/// The move-to-front list of symbols. Most symbols are taken from near the front: those move as
/// one 16-byte word, where calling memmove for every symbol was a tenth of the decoding time.
struct Mtf([u8; 256]);

impl Mtf {
    fn new() -> Self {
        Mtf(std::array::from_fn(|i| i as u8))
    }

    fn front(&self) -> u8 {
        self.0[0]
    }

    /// Takes the symbol at `pos` (below 256) to the front and returns it.
    #[inline(always)]
    fn move_to_front(&mut self, pos: usize) -> u8 {
        let v = self.0[pos];
        if pos < 16 {
            let w = u128::from_le_bytes(self.0[..16].try_into().expect("16 bytes"));
            let moved = u128::MAX >> (8 * (15 - pos));
            let w = (((w << 8) | v as u128) & moved) | (w & !moved);
            self.0[..16].copy_from_slice(&w.to_le_bytes());
        } else {
            self.0.copy_within(0..pos, 1);
            self.0[0] = v;
        }
        v
    }
}

/// Chains of the inverse transform walked at once. Each step of a chain is a load from a table
/// too large for the cache that the next step depends on, so a single chain leaves the core
/// waiting on one miss at a time; with several, several misses are in flight.
const LANES: usize = 16;
/// Rows the walk starts from: the text between two of them is one segment.
const STARTS: usize = 8 * LANES;
/// Marks a start row in `fwd`, above the 20 bits of row number and the 8 of character.
const START: u32 = 1 << 31;

/// A piece of the text: from its start row up to the next start row, as walked into a lane.
#[derive(Clone, Copy)]
struct Segment {
    row: usize,
    lane: usize,
    at: usize,
    len: usize,
    next: usize,
}

/// Rebuilds the text of a block from its links. The rows from the origin form one cycle through
/// the whole block; it is cut at rows spread over the block, the pieces are walked side by side,
/// each to where the next begins, and joined in the order the cycle gives. False when the cycle
/// through the origin is shorter than the block (a periodic block): `text` is then unset.
fn walk_segments(
    fwd: &mut [u32],
    origin: usize,
    text: &mut [u8],
    lanes: &mut [Vec<u8>; LANES],
    segments: &mut Vec<Segment>,
) -> bool {
    let n = fwd.len();
    segments.clear();
    let starts = STARTS.min(n);
    for j in 0..starts {
        let row = if j == 0 { origin } else { j * n / starts };
        if fwd[row] & START == 0 {
            fwd[row] |= START;
            segments.push(Segment {
                row,
                lane: 0,
                at: 0,
                len: 0,
                next: usize::MAX,
            });
        }
    }
    for lane in lanes.iter_mut() {
        lane.clear();
    }
    // Which segment each lane walks (usize::MAX: none) and the row it is at.
    let mut walking = [usize::MAX; LANES];
    let mut row = [0usize; LANES];
    let mut unstarted = 0;
    let mut begin = |l: usize,
                     walking: &mut [usize; LANES],
                     row: &mut [usize; LANES],
                     lanes: &mut [Vec<u8>; LANES],
                     segments: &mut Vec<Segment>| {
        if unstarted == segments.len() {
            walking[l] = usize::MAX;
            return false;
        }
        let seg = &mut segments[unstarted];
        seg.lane = l;
        seg.at = lanes[l].len();
        // The start row's own flag is not the end of its segment.
        let e = fwd[seg.row];
        lanes[l].push(e as u8);
        row[l] = ((e & !START) >> 8) as usize;
        walking[l] = unstarted;
        unstarted += 1;
        true
    };
    let mut active = 0;
    for l in 0..LANES {
        if begin(l, &mut walking, &mut row, lanes, segments) {
            active += 1;
        }
    }
    while active > 0 {
        for l in 0..LANES {
            let s = walking[l];
            if s == usize::MAX {
                continue;
            }
            let e = fwd[row[l]];
            if e & START != 0 {
                let seg = &mut segments[s];
                seg.next = row[l];
                seg.len = lanes[l].len() - seg.at;
                if !begin(l, &mut walking, &mut row, lanes, segments) {
                    active -= 1;
                }
                continue;
            }
            lanes[l].push(e as u8);
            row[l] = (e >> 8) as usize;
        }
    }
    for seg in segments.iter() {
        fwd[seg.row] &= !START;
    }

    // Join the pieces from the origin's, in the cycle's order.
    let mut at = 0;
    let mut s = 0;
    loop {
        let seg = segments[s];
        if seg.len > n - at {
            return false;
        }
        text[at..at + seg.len].copy_from_slice(&lanes[seg.lane][seg.at..seg.at + seg.len]);
        at += seg.len;
        if seg.next == origin {
            return at == n;
        }
        match segments.iter().position(|g| g.row == seg.next) {
            Some(next) => s = next,
            None => return false,
        }
    }
}

/// A decoder with its working memory, reused from one stream to the next: about 6 bytes per byte
/// of the largest block seen (3.6 MB of links, 0.9 MB of block and about as much in the walk's
/// lanes for level 9).
pub struct Decoder {
    block: Vec<u8>,
    fwd: Vec<u32>,
    lanes: [Vec<u8>; LANES],
    segments: Vec<Segment>,
    tables: Vec<Table>,
    selectors: Vec<u8>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub fn new() -> Self {
        Decoder {
            block: Vec::new(),
            fwd: Vec::new(),
            lanes: Default::default(),
            segments: Vec::with_capacity(STARTS),
            tables: (0..MAX_GROUPS).map(|_| Table::new()).collect(),
            selectors: Vec::with_capacity(MAX_SELECTORS),
        }
    }

    /// Decodes the bzip2 stream at the start of `input`, appending what it holds to `out`, at
    /// most `max_out` bytes in all. Returns how many bytes of `input` the stream took (the end of
    /// stream marker is followed by padding to a whole byte).
    pub fn decode_stream(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        max_out: usize,
    ) -> Result<usize> {
        if input.len() < 4 || &input[..3] != b"BZh" || !(b'1'..=b'9').contains(&input[3]) {
            return Err(Error::Corrupt("no bzip2 stream header"));
        }
        let max_block = (input[3] - b'0') as usize * 100_000;
        let mut br = Bits::new(&input[4..]);
        let mut combined = 0u32;
        loop {
            let magic = ((br.get(24) as u64) << 24) | br.get(24) as u64;
            match magic {
                BLOCK_MAGIC => {
                    let crc = self.block(&mut br, max_block, out, max_out)?;
                    combined = combined.rotate_left(1) ^ crc;
                }
                END_MAGIC => {
                    let stored = br.get(32);
                    if br.overrun() {
                        return Err(Error::Corrupt("the stream is truncated"));
                    }
                    if stored != combined {
                        return Err(Error::Corrupt("stream CRC mismatch"));
                    }
                    return Ok(4 + br.consumed_bits().div_ceil(8) as usize);
                }
                _ if br.overrun() => return Err(Error::Corrupt("the stream is truncated")),
                _ => return Err(Error::Corrupt("bad block header")),
            }
        }
    }

    /// One block: its bytes are appended to `out`; returns its CRC, checked.
    fn block(
        &mut self,
        br: &mut Bits,
        max_block: usize,
        out: &mut Vec<u8>,
        max_out: usize,
    ) -> Result<u32> {
        let stored_crc = br.get(32);
        if br.bit() {
            return Err(Error::Unsupported);
        }
        let orig_ptr = br.get(24) as usize;

        // The symbols in use.
        let mut seq_to_unseq = [0u8; 256];
        let mut in_use = 0usize;
        let used16 = br.get(16);
        for i in 0..16 {
            if used16 & (0x8000 >> i) != 0 {
                let bits = br.get(16);
                for j in 0..16 {
                    if bits & (0x8000 >> j) != 0 {
                        seq_to_unseq[in_use] = (i * 16 + j) as u8;
                        in_use += 1;
                    }
                }
            }
        }
        if in_use == 0 {
            return Err(Error::Corrupt("a block uses no symbols"));
        }
        let alpha = in_use + 2;

        // Selectors, move-to-front coded.
        let groups = br.get(3) as usize;
        if !(2..=MAX_GROUPS).contains(&groups) {
            return Err(Error::Corrupt("bad number of Huffman tables"));
        }
        let n_selectors = br.get(15) as usize;
        if n_selectors == 0 {
            return Err(Error::Corrupt("no selectors"));
        }
        let mut order = [0u8, 1, 2, 3, 4, 5];
        self.selectors.clear();
        for i in 0..n_selectors {
            let mut j = 0usize;
            while br.bit() {
                j += 1;
                if j >= groups {
                    return Err(Error::Corrupt("bad selector"));
                }
            }
            // libbz2 1.0.8 reads selectors past its limit and ignores them.
            if i < MAX_SELECTORS {
                let v = order[j];
                order.copy_within(0..j, 1);
                order[0] = v;
                self.selectors.push(v);
            }
            if i % 1024 == 0 && br.overrun() {
                return Err(Error::Corrupt("the stream is truncated"));
            }
        }

        // Code lengths, delta coded, then the tables.
        let mut lengths = [0u8; MAX_ALPHA];
        for t in 0..groups {
            let mut curr = br.get(5) as i32;
            for len in lengths.iter_mut().take(alpha) {
                loop {
                    if !(1..=MAX_CODE_LEN as i32).contains(&curr) {
                        return Err(Error::Corrupt("bad Huffman code length"));
                    }
                    if !br.bit() {
                        break;
                    }
                    if br.bit() {
                        curr -= 1;
                    } else {
                        curr += 1;
                    }
                }
                *len = curr as u8;
            }
            self.tables[t].build(&lengths[..alpha]);
        }
        if br.overrun() {
            return Err(Error::Corrupt("the stream is truncated"));
        }

        // The move-to-front and run-length coded symbols: the block's last column.
        if self.block.len() < max_block {
            self.block = vec![0; max_block];
            self.fwd = vec![0; max_block];
        }
        let block = &mut self.block[..max_block];
        let eob = in_use + 1;
        let mut mtf = Mtf::new();
        let mut counts = [0u32; 256];
        let mut n = 0usize;
        let mut group = 0usize;
        let mut left = 0usize;
        let mut table = &self.tables[0];
        let selectors = &self.selectors;
        let tables = &self.tables;
        // The next symbol, its table changing every GROUP_SIZE symbols. A macro rather than a
        // closure: the closure was not inlined, and it runs once per symbol.
        macro_rules! next {
            () => {{
                if left == 0 {
                    let Some(&sel) = selectors.get(group) else {
                        return Err(Error::Corrupt("more symbols than selectors"));
                    };
                    group += 1;
                    left = GROUP_SIZE;
                    table = &tables[sel as usize];
                    if br.overrun() {
                        return Err(Error::Corrupt("the stream is truncated"));
                    }
                }
                left -= 1;
                table.decode(br)?
            }};
        }
        let mut sym = next!();
        loop {
            if sym == eob {
                break;
            }
            if sym <= 1 {
                // RUNA/RUNB: a run of the symbol at the front, its length in bijective base 2.
                let mut run = 0usize;
                let mut weight = 1usize;
                while sym <= 1 {
                    run += weight << sym;
                    weight <<= 1;
                    if weight >= 2 * 1024 * 1024 {
                        return Err(Error::Corrupt("run too long"));
                    }
                    sym = next!();
                }
                let c = seq_to_unseq[mtf.front() as usize];
                if run > max_block - n {
                    return Err(Error::Corrupt("block longer than its header allows"));
                }
                block[n..n + run].fill(c);
                counts[c as usize] += run as u32;
                n += run;
                continue;
            }
            if n >= max_block {
                return Err(Error::Corrupt("block longer than its header allows"));
            }
            let v = mtf.move_to_front(sym - 1);
            let c = seq_to_unseq[v as usize];
            block[n] = c;
            counts[c as usize] += 1;
            n += 1;
            sym = next!();
        }
        if orig_ptr >= n {
            return Err(Error::Corrupt("bad block origin"));
        }

        // Links: fwd[k] leads from row k to the row of the next rotation, and carries row k's
        // character in its low byte.
        let mut start = [0u32; 256];
        let mut sum = 0u32;
        for (s, &c) in start.iter_mut().zip(counts.iter()) {
            *s = sum;
            sum += c;
        }
        let fwd = &mut self.fwd[..n];
        for (i, &c) in block[..n].iter().enumerate() {
            let k = start[c as usize];
            start[c as usize] = k + 1;
            fwd[k as usize] = ((i as u32) << 8) | c as u32;
        }
        let text = &mut block[..n];
        if !walk_segments(fwd, orig_ptr, text, &mut self.lanes, &mut self.segments) {
            // A periodic block: the rows from the origin form a shorter cycle, walked round
            // until the block is full.
            let mut p = orig_ptr;
            for t in text.iter_mut() {
                let e = fwd[p];
                *t = e as u8;
                p = (e >> 8) as usize;
            }
        }

        // Undo the first run-length pass: four equal bytes are followed by a count of more.
        let start_len = out.len();
        let mut i = 0;
        while i < n {
            // The next four equal bytes from i. Where text[j+2] and text[j+3] differ, no run of
            // four starts at j, j+1 or j+2, so most steps skip three bytes.
            let mut j = i;
            while j + 3 < n {
                if text[j + 2] != text[j + 3] {
                    j += 3;
                } else if text[j + 1] != text[j + 2] {
                    j += 2;
                } else if text[j] != text[j + 1] {
                    j += 1;
                } else {
                    break;
                }
            }
            if j + 3 >= n {
                if out.len() + (n - i) > max_out {
                    return Err(Error::TooLarge);
                }
                out.extend_from_slice(&text[i..n]);
                break;
            }
            let extra = text.get(j + 4).map_or(0, |&k| k as usize);
            if out.len() + (j + 4 - i) + extra > max_out {
                return Err(Error::TooLarge);
            }
            out.extend_from_slice(&text[i..j + 4]);
            out.resize(out.len() + extra, text[j]);
            i = j + 5;
        }
        let crc = BZIP2_CRC.checksum(&out[start_len..]);
        if crc != stored_crc {
            return Err(Error::Corrupt("block CRC mismatch"));
        }
        Ok(crc)
    }
}

const BZIP2_CRC: crc::Crc<u32, crc::Table<16>> =
    crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_BZIP2);

#[cfg(test)]
mod tests {
    use super::Mtf;

    #[test]
    fn move_to_front_matches_a_plain_list() {
        let mut list: Vec<u8> = (0..=255).collect();
        let mut mtf = Mtf::new();
        // Every position, including each word's first and last byte, many times over.
        let mut x = 12345u32;
        for i in 0..20_000usize {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let pos = if i < 256 { i } else { (x >> 16) as usize % 256 };
            let v = list.remove(pos);
            list.insert(0, v);
            assert_eq!(mtf.move_to_front(pos), v, "symbol taken at position {pos}");
            assert_eq!(mtf.front(), v);
        }
        assert_eq!(mtf.0.to_vec(), list);
    }
}
