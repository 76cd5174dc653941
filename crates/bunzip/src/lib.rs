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

    #[inline]
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
        // A long code (or garbage): bit by bit, as libbz2 does.
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

/// A decoder with its working memory, reused from one stream to the next: about 9 bytes per byte
/// of the largest block seen (3.6 MB of links each way and 0.9 MB of block for level 9).
pub struct Decoder {
    block: Vec<u8>,
    fwd: Vec<u32>,
    bwd: Vec<u32>,
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
            bwd: Vec::new(),
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
            self.bwd = vec![0; max_block];
        }
        let block = &mut self.block[..max_block];
        let eob = in_use + 1;
        let mut mtf: [u8; 256] = std::array::from_fn(|i| i as u8);
        let mut counts = [0u32; 256];
        let mut n = 0usize;
        let mut group = 0usize;
        let mut left = 0usize;
        let mut table = &self.tables[0];
        let mut next = |br: &mut Bits| -> Result<usize> {
            if left == 0 {
                let Some(&sel) = self.selectors.get(group) else {
                    return Err(Error::Corrupt("more symbols than selectors"));
                };
                group += 1;
                left = GROUP_SIZE;
                table = &self.tables[sel as usize];
                if br.overrun() {
                    return Err(Error::Corrupt("the stream is truncated"));
                }
            }
            left -= 1;
            table.decode(br)
        };
        let mut sym = next(br)?;
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
                    sym = next(br)?;
                }
                let c = seq_to_unseq[mtf[0] as usize];
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
            let pos = sym - 1;
            let v = mtf[pos];
            mtf.copy_within(0..pos, 1);
            mtf[0] = v;
            let c = seq_to_unseq[v as usize];
            block[n] = c;
            counts[c as usize] += 1;
            n += 1;
            sym = next(br)?;
        }
        if orig_ptr >= n {
            return Err(Error::Corrupt("bad block origin"));
        }

        // Links both ways: fwd[k] leads from row k to the row of the next rotation, bwd[i] to
        // the previous one; each carries its row's character in the low byte.
        let mut start = [0u32; 256];
        let mut sum = 0u32;
        for (s, &c) in start.iter_mut().zip(counts.iter()) {
            *s = sum;
            sum += c;
        }
        let fwd = &mut self.fwd[..n];
        let bwd = &mut self.bwd[..n];
        for (i, &c) in block[..n].iter().enumerate() {
            let k = start[c as usize];
            start[c as usize] = k + 1;
            fwd[k as usize] = ((i as u32) << 8) | c as u32;
            bwd[i] = (k << 8) | c as u32;
        }
        // Walk from the original row forwards (text from its start) and backwards (text from
        // its end) at once: two independent chains of loads.
        let text = &mut block[..n];
        let (mut p, mut q) = (orig_ptr, orig_ptr);
        let half = n / 2;
        for s in 0..half {
            let e = fwd[p];
            let f = bwd[q];
            text[s] = e as u8;
            text[n - 1 - s] = f as u8;
            p = (e >> 8) as usize;
            q = (f >> 8) as usize;
        }
        if n % 2 == 1 {
            text[half] = fwd[p] as u8;
        }

        // Undo the first run-length pass: four equal bytes are followed by a count of more.
        let start_len = out.len();
        let mut i = 0;
        while i < n {
            let mut j = i;
            while j + 3 < n
                && !(text[j] == text[j + 1] && text[j] == text[j + 2] && text[j] == text[j + 3])
            {
                j += 1;
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
