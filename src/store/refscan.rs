//! Reference scanning: finding the hash parts of store paths in a byte
//! stream, the way Nix's `RefScanSink` does.
//!
//! Nix decides which store paths an output references by looking for the
//! 32-character nix-base32 *hash part* of every candidate path
//! (`/nix/store/<hash>-<name>`) in the NAR serialisation of the output. Any
//! 32-byte window of the stream that consists only of nix-base32 characters
//! and equals a candidate's hash part is a reference, wherever it occurs: in
//! file contents, in file names, in symlink targets. A 31-character fragment
//! is not.
//!
//! [`RefScanner`] is fed the stream in pieces of any size and finds windows
//! that straddle piece boundaries. It skips ahead on non-base32 bytes (like
//! Nix, checking each window from its end, so binary data costs about one
//! table look-up per 32 bytes), walks long base32 runs in O(1) per byte with
//! a rolling key into a 4-character prefix bitmap, and only does an exact
//! hash-set look-up for windows that pass the bitmap. Once every candidate
//! has been found it stops looking at the data at all.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Length of a store path hash part in characters.
pub const HASH_PART_LEN: usize = 32;

/// The nix-base32 alphabet (note: no `e`, `o`, `u`, `t`).
pub const NIX_BASE32_CHARS: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

const NOT_BASE32: u8 = 0xff;

/// Byte → 5-bit nix-base32 digit value, or `NOT_BASE32`.
static DIGIT: [u8; 256] = {
    let mut table = [NOT_BASE32; 256];
    let mut i = 0;
    while i < NIX_BASE32_CHARS.len() {
        table[NIX_BASE32_CHARS[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// Whether `byte` is a nix-base32 character.
#[inline]
#[must_use]
pub fn is_base32(byte: u8) -> bool {
    DIGIT[byte as usize] != NOT_BASE32
}

/// Parse a 32-character hash part; `None` unless every byte is nix-base32.
#[must_use]
pub fn parse_hash_part(s: &[u8]) -> Option<[u8; HASH_PART_LEN]> {
    let part: [u8; HASH_PART_LEN] = s.try_into().ok()?;
    part.iter().all(|&b| is_base32(b)).then_some(part)
}

/// Hasher for keys that are already (base32 renderings of) cryptographic
/// hashes: takes the first 8 bytes as the hash value. The key set is fixed
/// before any untrusted data is looked up, so colliding look-ups cost one
/// extra comparison each, never more.
#[derive(Default)]
struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        // Spread the entropy over all bits (hashbrown uses the top 7 bits as
        // a tag and the low bits as the bucket index).
        self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as a length prefix, then its bytes in one call:
        // the state ends up as the first 8 bytes of the key.
        for &b in bytes.iter().take(8) {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
}

type PrefixMap = HashMap<[u8; HASH_PART_LEN], usize, BuildHasherDefault<PrefixHasher>>;

/// Base32 digits of a window's prefix used for the prefilter bitmap.
const PREFIX_CHARS: usize = 4;
const PREFIX_MASK: usize = (1 << (5 * PREFIX_CHARS)) - 1;
const PREFILTER_BITS: usize = 1 << (5 * PREFIX_CHARS);

/// An immutable set of candidate hash parts, indexed `0..len()` in insertion
/// order (duplicates are folded into their first index).
#[derive(Clone)]
pub struct HashParts {
    parts: Vec<[u8; HASH_PART_LEN]>,
    index: PrefixMap,
    prefilter: Box<[u64; PREFILTER_BITS / 64]>,
}

impl std::fmt::Debug for HashParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.parts.iter().map(|p| String::from_utf8_lossy(p)))
            .finish()
    }
}

/// The prefilter key of a window: its first `PREFIX_CHARS` digits. The
/// window must consist of base32 characters.
#[inline]
fn prefix_key(window: &[u8]) -> usize {
    window[..PREFIX_CHARS]
        .iter()
        .fold(0, |k, &b| (k << 5) | usize::from(DIGIT[b as usize]))
}

impl HashParts {
    /// Build the set. Every part must consist of nix-base32 characters only
    /// (use [`parse_hash_part`]); parts that don't can never match.
    pub fn new<I: IntoIterator<Item = [u8; HASH_PART_LEN]>>(parts: I) -> Self {
        let mut set = HashParts {
            parts: Vec::new(),
            index: PrefixMap::default(),
            prefilter: vec![0; PREFILTER_BITS / 64]
                .into_boxed_slice()
                .try_into()
                .unwrap_or_else(|_| Box::new([0; PREFILTER_BITS / 64])),
        };
        for part in parts {
            set.insert(part);
        }
        set
    }

    /// Add a part (if new) and return its index.
    pub fn insert(&mut self, part: [u8; HASH_PART_LEN]) -> usize {
        if let Some(&i) = self.index.get(&part) {
            return i;
        }
        let i = self.parts.len();
        self.parts.push(part);
        self.index.insert(part, i);
        if part.iter().all(|&b| is_base32(b)) {
            let key = prefix_key(&part);
            self.prefilter[key / 64] |= 1 << (key % 64);
        }
        i
    }

    /// Number of distinct parts.
    #[must_use]
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    /// Whether the set is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The part with index `i`.
    #[must_use]
    pub fn get(&self, i: usize) -> Option<&[u8; HASH_PART_LEN]> {
        self.parts.get(i)
    }

    /// Index of `part`, if it is in the set.
    #[must_use]
    pub fn index_of(&self, part: &[u8; HASH_PART_LEN]) -> Option<usize> {
        self.index.get(part).copied()
    }

    /// Whether some part may start with the prefix whose key is `key`.
    #[inline]
    fn may_match(&self, key: usize) -> bool {
        let key = key & PREFIX_MASK;
        self.prefilter[key / 64] & (1 << (key % 64)) != 0
    }

    /// Exact look-up of a 32-byte window.
    #[inline]
    fn lookup(&self, window: &[u8]) -> Option<usize> {
        let part: &[u8; HASH_PART_LEN] = window.try_into().ok()?;
        self.index.get(part).copied()
    }
}

/// Streaming scanner over a [`HashParts`] set. Feed it the NAR stream with
/// [`feed`](Self::feed) in pieces of any size; query the result with
/// [`found`](Self::found).
#[derive(Debug, Clone)]
pub struct RefScanner<'a> {
    parts: &'a HashParts,
    found: Vec<bool>,
    remaining: usize,
    /// The last up to 31 bytes seen, for windows straddling two pieces.
    tail: [u8; HASH_PART_LEN - 1],
    tail_len: usize,
}

impl<'a> RefScanner<'a> {
    /// A scanner with nothing found yet.
    #[must_use]
    pub fn new(parts: &'a HashParts) -> Self {
        RefScanner {
            parts,
            found: vec![false; parts.len()],
            remaining: parts.len(),
            tail: [0; HASH_PART_LEN - 1],
            tail_len: 0,
        }
    }

    /// Scan the next piece of the stream.
    pub fn feed(&mut self, data: &[u8]) {
        if self.remaining == 0 || data.is_empty() {
            return;
        }
        const T: usize = HASH_PART_LEN - 1;
        if self.tail_len > 0 {
            // Windows that start in the tail and end in `data`.
            let take = data.len().min(T);
            let mut joint = [0u8; 2 * T];
            joint[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
            joint[self.tail_len..self.tail_len + take].copy_from_slice(&data[..take]);
            self.scan(&joint[..self.tail_len + take]);
        }
        self.scan(data);
        // Keep the last T bytes of tail ++ data.
        if data.len() >= T {
            self.tail.copy_from_slice(&data[data.len() - T..]);
            self.tail_len = T;
        } else {
            let keep = (T - data.len()).min(self.tail_len);
            self.tail
                .copy_within(self.tail_len - keep..self.tail_len, 0);
            self.tail[keep..keep + data.len()].copy_from_slice(data);
            self.tail_len = keep + data.len();
        }
    }

    /// Scan one contiguous slice for 32-byte all-base32 windows.
    fn scan(&mut self, s: &[u8]) {
        let n = s.len();
        let mut i = 0; // start of the current window
        let mut good_end = 0; // s[i..good_end] is known to be all base32
        'windows: while i + HASH_PART_LEN <= n {
            let end = i + HASH_PART_LEN;
            // Check the not-yet-known bytes of the window, from its end, and
            // skip past the last non-base32 byte (like Nix).
            let lo = good_end.max(i);
            let mut k = end;
            while k > lo {
                k -= 1;
                if !is_base32(s[k]) {
                    i = k + 1;
                    good_end = end;
                    continue 'windows;
                }
            }
            // s[i..end] is all base32: find where the run ends, then look
            // at every window in it.
            let mut run_end = end;
            while run_end < n && is_base32(s[run_end]) {
                run_end += 1;
            }
            if self.scan_run(&s[i..run_end]) {
                return;
            }
            i = run_end + 1;
            good_end = i;
        }
    }

    /// Check every window of `run` (all base32, at least 32 bytes), rolling
    /// the prefilter key. Returns true once everything has been found.
    fn scan_run(&mut self, run: &[u8]) -> bool {
        // The key lives in the top bits of a u32 so that rolling a digit in
        // is just shift + or (old digits fall off the top).
        const SHIFT: u32 = 32 - 5 * PREFIX_CHARS as u32;
        let parts = self.parts; // keeps the bitmap pointer in a register
        let windows = run.len() + 1 - HASH_PART_LEN;
        let mut key = (prefix_key(run) as u32) << SHIFT;
        if parts.may_match((key >> SHIFT) as usize) && self.hit(&run[..HASH_PART_LEN]) {
            return true;
        }
        let rolling_in = &run[PREFIX_CHARS..PREFIX_CHARS + windows - 1];
        for (j, &c) in rolling_in.iter().enumerate() {
            key = (key << 5) | (u32::from(DIGIT[c as usize]) << SHIFT);
            if parts.may_match((key >> SHIFT) as usize) {
                let start = j + 1;
                if self.hit(&run[start..start + HASH_PART_LEN]) {
                    return true;
                }
            }
        }
        false
    }

    /// Exact check of a window that passed the prefilter; returns true once
    /// everything has been found.
    #[cold]
    fn hit(&mut self, window: &[u8]) -> bool {
        if let Some(idx) = self.parts.lookup(window) {
            if !self.found[idx] {
                self.found[idx] = true;
                self.remaining -= 1;
            }
        }
        self.remaining == 0
    }

    /// Whether every candidate has been found (further data is skipped).
    #[must_use]
    pub fn all_found(&self) -> bool {
        self.remaining == 0
    }

    /// Indices (into the [`HashParts`]) of the candidates found so far, in
    /// increasing order.
    pub fn found(&self) -> impl Iterator<Item = usize> + '_ {
        self.found
            .iter()
            .enumerate()
            .filter_map(|(i, &f)| f.then_some(i))
    }

    /// Whether candidate `i` has been found.
    #[must_use]
    pub fn is_found(&self, i: usize) -> bool {
        self.found.get(i).copied().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(seed: u8) -> [u8; 32] {
        let mut p = [0u8; 32];
        for (i, b) in p.iter_mut().enumerate() {
            *b = NIX_BASE32_CHARS[(usize::from(seed) * 7 + i * 13) % 32];
        }
        p
    }

    fn scan_all(parts: &HashParts, pieces: &[&[u8]]) -> Vec<usize> {
        let mut s = RefScanner::new(parts);
        for p in pieces {
            s.feed(p);
        }
        s.found().collect()
    }

    /// Reference implementation: every 32-byte window, no skipping.
    fn naive(parts: &HashParts, data: &[u8]) -> Vec<usize> {
        let mut found = vec![false; parts.len()];
        for w in data.windows(32) {
            if let Some(p) = parse_hash_part(w) {
                if let Some(i) = parts.index_of(&p) {
                    found[i] = true;
                }
            }
        }
        found
            .iter()
            .enumerate()
            .filter_map(|(i, &f)| f.then_some(i))
            .collect()
    }

    #[test]
    fn alphabet_table() {
        for b in 0..=255u8 {
            assert_eq!(is_base32(b), NIX_BASE32_CHARS.contains(&b), "{b}");
        }
        assert!(!is_base32(b'e') && !is_base32(b'o') && !is_base32(b'u') && !is_base32(b't'));
    }

    #[test]
    fn finds_hash_in_contents() {
        let parts = HashParts::new([part(1), part(2)]);
        let mut data = b"prefix /nix/store/".to_vec();
        data.extend_from_slice(&part(2));
        data.extend_from_slice(b"-foo suffix");
        assert_eq!(scan_all(&parts, &[&data]), vec![1]);
    }

    #[test]
    fn ignores_non_candidates_and_short_fragments() {
        let parts = HashParts::new([part(1)]);
        // A different valid hash part.
        let mut data = part(9).to_vec();
        // A 31-character fragment of the candidate, delimited.
        data.push(b'-');
        data.extend_from_slice(&part(1)[..31]);
        data.push(b'/');
        data.extend_from_slice(&part(1)[1..]);
        data.push(b'.');
        assert!(scan_all(&parts, &[&data]).is_empty());
        // The fragment embedded in a longer base32 run still counts when the
        // full 32 characters are present (Nix matches any window).
        let mut data = b"00".to_vec();
        data.extend_from_slice(&part(1));
        data.extend_from_slice(b"11");
        assert_eq!(scan_all(&parts, &[&data]), vec![0]);
    }

    #[test]
    fn finds_across_every_split_point() {
        let parts = HashParts::new([part(3), part(4)]);
        let mut data = vec![0u8; 40];
        data.extend_from_slice(&part(4));
        data.extend_from_slice(&[0xffu8; 40]);
        for cut in 0..=data.len() {
            assert_eq!(
                scan_all(&parts, &[&data[..cut], &data[cut..]]),
                vec![1],
                "cut at {cut}"
            );
        }
        // Byte-by-byte feeding.
        let pieces: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(scan_all(&parts, &pieces), vec![1]);
        // Three pieces with small middle parts.
        for a in 30..45 {
            for b in a..a + 20 {
                assert_eq!(
                    scan_all(&parts, &[&data[..a], &data[a..b], &data[b..]]),
                    vec![1]
                );
            }
        }
    }

    #[test]
    fn long_base32_runs_and_stop_when_all_found() {
        let parts = HashParts::new([part(5), part(6)]);
        let mut data = vec![b'0'; 10_000];
        data.extend_from_slice(&part(6));
        data.extend(std::iter::repeat_n(b'z', 5000));
        data.extend_from_slice(&part(5));
        assert_eq!(scan_all(&parts, &[&data]), vec![0, 1]);
        let mut s = RefScanner::new(&parts);
        s.feed(&data);
        assert!(s.all_found());
    }

    #[test]
    fn matches_naive_on_pseudorandom_data() {
        let cands: Vec<[u8; 32]> = (0..50).map(part).collect();
        let parts = HashParts::new(cands.clone());
        let mut state = 0x2545f4914f6cdd1du64;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..200 {
            let len = (rnd() % 3000) as usize;
            let mut data: Vec<u8> = (0..len)
                .map(|_| {
                    let r = rnd();
                    if r % 3 == 0 {
                        (r >> 8) as u8
                    } else {
                        NIX_BASE32_CHARS[(r >> 8) as usize % 32]
                    }
                })
                .collect();
            // Plant some candidates, sometimes overlapping.
            for _ in 0..(rnd() % 4) {
                if data.len() > 40 {
                    let at = (rnd() as usize) % (data.len() - 32);
                    let c = &cands[(rnd() as usize) % cands.len()];
                    data[at..at + 32].copy_from_slice(c);
                }
            }
            let expect = naive(&parts, &data);
            let cut1 = if data.is_empty() {
                0
            } else {
                (rnd() as usize) % data.len()
            };
            let cut2 = cut1 + (rnd() as usize % 50).min(data.len() - cut1);
            assert_eq!(
                scan_all(&parts, &[&data[..cut1], &data[cut1..cut2], &data[cut2..]]),
                expect,
                "round {round}"
            );
        }
    }

    #[test]
    fn duplicates_and_parse() {
        let mut parts = HashParts::new([part(1), part(1), part(2)]);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts.insert(part(2)), 1);
        assert!(parse_hash_part(b"0123456789abcdfghijklmnpqrsvwxyz").is_some());
        assert!(parse_hash_part(b"0123456789abcdfghijklmnpqrsvwxye").is_none());
        assert!(parse_hash_part(b"0123").is_none());
        let empty = HashParts::new([]);
        let mut s = RefScanner::new(&empty);
        s.feed(&part(1));
        assert_eq!(s.found().count(), 0);
    }
}
