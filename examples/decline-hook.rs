//! Benchmark fixture for `scripts/bench declined`: the cheapest build hook
//! that speaks Nix's protocol — it reads the settings, then answers every
//! `try` with `# decline`. Nothing but the standard library, so it is the
//! protocol's floor for start-up and per-`try` cost.

use std::io::{self, Read, Write};

fn u64_or_eof(r: &mut impl Read) -> io::Result<Option<u64>> {
    let mut b = [0u8; 8];
    match r.read_exact(&mut b) {
        Ok(()) => Ok(Some(u64::from_le_bytes(b))),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

fn u64(r: &mut impl Read) -> io::Result<u64> {
    u64_or_eof(r)?.ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
}

/// Skips one length-prefixed, 8-byte padded string.
fn skip_string(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<()> {
    let len = u64(r)?;
    skip_bytes(r, buf, len.div_ceil(8) * 8)
}

fn skip_bytes(r: &mut impl Read, buf: &mut Vec<u8>, n: u64) -> io::Result<()> {
    buf.resize(n as usize, 0);
    r.read_exact(buf)
}

fn main() -> io::Result<()> {
    let mut input = io::stdin().lock();
    let mut err = io::stderr().lock();
    let mut buf = Vec::new();
    while u64(&mut input)? == 1 {
        skip_string(&mut input, &mut buf)?;
        skip_string(&mut input, &mut buf)?;
    }
    // "try", am-willing, system, drv path, features.
    while let Some(len) = u64_or_eof(&mut input)? {
        skip_bytes(&mut input, &mut buf, len.div_ceil(8) * 8)?;
        u64(&mut input)?;
        skip_string(&mut input, &mut buf)?;
        skip_string(&mut input, &mut buf)?;
        for _ in 0..u64(&mut input)? {
            skip_string(&mut input, &mut buf)?;
        }
        err.write_all(b"# decline\n")?;
    }
    Ok(())
}
