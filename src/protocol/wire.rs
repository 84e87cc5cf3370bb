//! Nix's serialisation primitives, as written by `Sink <<` and read by
//! `readNum`/`readString`/`readStrings` in Nix.
//!
//! Every read is bounded so a corrupt or hostile stream cannot make the
//! hook allocate without limit.

use std::io::{self, Read, Write};

/// Longest string we accept (a setting value such as `nix-path` can be long,
/// a store path is at most a few hundred bytes).
pub const MAX_STRING: u64 = 64 << 20;
/// Longest string list we accept (an input closure can hold many thousand paths).
pub const MAX_LIST: u64 = 1 << 22;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream ended inside a value.
    #[error("stream ended in the middle of {0}")]
    Truncated(&'static str),
    /// A length prefix beyond our limits.
    #[error("{what} is {len} long, more than allowed")]
    TooLong { what: &'static str, len: u64 },
    /// Padding bytes after a string were not zero.
    #[error("non-zero padding after {0}")]
    BadPadding(&'static str),
    #[error("{0}")]
    Io(io::Error),
}

fn read_exact_or(r: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<(), WireError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            WireError::Truncated(what)
        } else {
            WireError::Io(e)
        }
    })
}

/// Reads a u64; `Ok(None)` on a clean end of stream before its first byte.
pub fn read_u64_or_eof(r: &mut impl Read, what: &'static str) -> Result<Option<u64>, WireError> {
    let mut buf = [0u8; 8];
    let mut filled = 0;
    while filled < 8 {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(WireError::Truncated(what)),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(Some(u64::from_le_bytes(buf)))
}

pub fn read_u64(r: &mut impl Read, what: &'static str) -> Result<u64, WireError> {
    let mut buf = [0u8; 8];
    read_exact_or(r, &mut buf, what)?;
    Ok(u64::from_le_bytes(buf))
}

/// Reads a byte string into `out` (cleared first), so a caller on a hot path
/// can reuse one buffer.
pub fn read_bytes_into(
    r: &mut impl Read,
    out: &mut Vec<u8>,
    max: u64,
    what: &'static str,
) -> Result<(), WireError> {
    let len = read_u64(r, what)?;
    if len > max {
        return Err(WireError::TooLong { what, len });
    }
    out.clear();
    // Grow as data arrives: a huge length prefix on a short stream must not
    // allocate up front. Read straight into `out` (this is on the per-`try`
    // path: no bounce buffer to zero).
    let mut remaining = len;
    while remaining > 0 {
        let n = remaining.min(64 * 1024) as usize;
        let start = out.len();
        out.resize(start + n, 0);
        read_exact_or(r, &mut out[start..], what)?;
        remaining -= n as u64;
    }
    let pad = padding(len);
    if pad > 0 {
        let mut zeros = [0u8; 8];
        read_exact_or(r, &mut zeros[..pad], what)?;
        if zeros[..pad].iter().any(|&b| b != 0) {
            return Err(WireError::BadPadding(what));
        }
    }
    Ok(())
}

pub fn read_bytes(r: &mut impl Read, max: u64, what: &'static str) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    read_bytes_into(r, &mut out, max, what)?;
    Ok(out)
}

/// Nix strings are bytes: ones that are not UTF-8 (a Latin-1 setting, a
/// feature name from a Latin-1 .nix file) are taken lossily — such a name
/// can't match a route anyway, and refusing it would end the conversation
/// and with it Nix's whole run.
fn utf8_lossy(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

pub fn read_string(r: &mut impl Read, what: &'static str) -> Result<String, WireError> {
    let mut s = String::new();
    read_string_into(r, &mut s, what)?;
    Ok(s)
}

/// Reads a string into `out`, reusing its buffer.
pub fn read_string_into(
    r: &mut impl Read,
    out: &mut String,
    what: &'static str,
) -> Result<(), WireError> {
    let mut bytes = std::mem::take(out).into_bytes();
    read_bytes_into(r, &mut bytes, MAX_STRING, what)?;
    *out = utf8_lossy(bytes);
    Ok(())
}

/// Reads a string list into `out`, reusing its strings; strings it no
/// longer needs go to `spare` and are reused from there.
pub fn read_string_list_into(
    r: &mut impl Read,
    out: &mut Vec<String>,
    spare: &mut Vec<String>,
    what: &'static str,
) -> Result<(), WireError> {
    let n = read_u64(r, what)?;
    if n > MAX_LIST {
        return Err(WireError::TooLong { what, len: n });
    }
    let n = n as usize;
    while out.len() > n {
        spare.extend(out.pop());
    }
    for i in 0..n {
        if i == out.len() {
            out.push(spare.pop().unwrap_or_default());
        }
        read_string_into(r, &mut out[i], what)?;
    }
    Ok(())
}

pub fn read_string_list(r: &mut impl Read, what: &'static str) -> Result<Vec<String>, WireError> {
    let mut out = Vec::new();
    read_string_list_into(r, &mut out, &mut Vec::new(), what)?;
    Ok(out)
}

/// Zero bytes that follow a string of `len` bytes.
pub fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

pub fn write_u64(w: &mut impl Write, n: u64) -> io::Result<()> {
    w.write_all(&n.to_le_bytes())
}

pub fn write_bytes(w: &mut impl Write, s: &[u8]) -> io::Result<()> {
    write_u64(w, s.len() as u64)?;
    w.write_all(s)?;
    w.write_all(&[0u8; 8][..padding(s.len() as u64)])
}

pub fn write_string_list<S: AsRef<[u8]>>(w: &mut impl Write, items: &[S]) -> io::Result<()> {
    write_u64(w, items.len() as u64)?;
    for s in items {
        write_bytes(w, s.as_ref())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(s: &[u8]) {
        let mut buf = Vec::new();
        write_bytes(&mut buf, s).unwrap();
        assert_eq!(buf.len() % 8, 0);
        assert_eq!(buf.len(), 8 + s.len() + padding(s.len() as u64));
        let back = read_bytes(&mut &buf[..], MAX_STRING, "s").unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn strings_are_padded_to_eight_bytes() {
        for len in 0..20 {
            roundtrip(&vec![b'x'; len]);
        }
        let mut buf = Vec::new();
        write_bytes(&mut buf, b"try").unwrap();
        assert_eq!(buf, b"\x03\0\0\0\0\0\0\0try\0\0\0\0\0");
    }

    #[test]
    fn lists_roundtrip() {
        let mut buf = Vec::new();
        write_string_list(&mut buf, &["a", "bcdefghij", ""]).unwrap();
        let back = read_string_list(&mut &buf[..], "l").unwrap();
        assert_eq!(back, vec!["a", "bcdefghij", ""]);
    }

    #[test]
    fn truncation_is_reported_not_panicked() {
        let mut buf = Vec::new();
        write_bytes(&mut buf, b"hello world").unwrap();
        for cut in 0..buf.len() {
            let err = read_bytes(&mut &buf[..cut], MAX_STRING, "name").unwrap_err();
            assert!(matches!(err, WireError::Truncated("name")), "{cut}: {err}");
        }
    }

    #[test]
    fn huge_length_prefix_does_not_allocate() {
        let mut buf = Vec::new();
        write_u64(&mut buf, MAX_STRING + 1).unwrap();
        let err = read_bytes(&mut &buf[..], MAX_STRING, "v").unwrap_err();
        assert!(matches!(err, WireError::TooLong { .. }));
        // Within the limit but longer than the stream: truncated, cheaply.
        let mut buf = Vec::new();
        write_u64(&mut buf, MAX_STRING).unwrap();
        let err = read_bytes(&mut &buf[..], MAX_STRING, "v").unwrap_err();
        assert!(matches!(err, WireError::Truncated("v")));
    }

    #[test]
    fn nonzero_padding_is_rejected() {
        let mut buf = Vec::new();
        write_bytes(&mut buf, b"abc").unwrap();
        *buf.last_mut().unwrap() = 1;
        assert!(matches!(
            read_bytes(&mut &buf[..], MAX_STRING, "p"),
            Err(WireError::BadPadding("p"))
        ));
    }

    #[test]
    fn clean_eof_versus_truncated_number() {
        assert!(read_u64_or_eof(&mut &b""[..], "n").unwrap().is_none());
        assert!(matches!(
            read_u64_or_eof(&mut &b"\x01\x02"[..], "n"),
            Err(WireError::Truncated("n"))
        ));
    }
}
