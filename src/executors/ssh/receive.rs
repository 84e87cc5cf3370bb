//! The agent's answer, frame by frame (`protocol::hatch`): the `Hello`
//! (protocol version, far-side temporary dir), `Log` frames into the build
//! log, `Data` frames into the tar unpacker, then the `Trailer`. A second
//! thread hashes every frame and unpacks the archive into the staging dir
//! while this one reads the channel. Nothing counts as received unless the
//! trailer's length and blake3 digest match every byte before it and its
//! tar byte count matches the `Data` frames; a truncated or corrupted
//! stream is an error here and nothing is imported.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::channel::ChannelReader;
use super::unpack;
use crate::protocol::buildlog::LogSink;
use crate::protocol::hatch::{self, FrameError, Hello, Trailer, HEADER_LEN, MAX_DATA};

/// The agent's answer, checked against its trailer.
pub struct Received {
    pub trailer: Trailer,
    /// The far side's temporary directory (from the `Hello`).
    pub temp_dir: String,
    /// Outputs in which that directory was found.
    pub temp_path_hits: Vec<String>,
    /// From the first `Data` frame to the trailer.
    pub transfer: Option<Duration>,
    /// What the command used there (agents asked for limits say).
    pub usage: Option<crate::usage::Usage>,
}

/// Why no answer was received.
pub enum RecvError {
    /// The agent reported a failure (an `Error` frame).
    Far(String),
    /// The stream broke: truncated, corrupted, connection lost.
    Stream(String),
}

fn stream_err(e: FrameError) -> RecvError {
    RecvError::Stream(match e {
        FrameError::Eof { .. } => {
            "the stream ended before its trailer (agent or connection gone); nothing imported"
                .to_owned()
        }
        FrameError::Io(e) => format!("{e}; nothing imported"),
        other => format!("corrupted stream: {other}; nothing imported"),
    })
}

/// How often (in output bytes) the transfer's progress is reported.
pub const PROGRESS_STEP: u64 = 4 << 20;

/// Reads the agent's answer to the end; the outputs are unpacked below
/// `roots` (output name → staging path). `on_data` hears the number of
/// output bytes received so far, every [`PROGRESS_STEP`] bytes and at the
/// end (for the progress Nix shows).
pub fn receive(
    frames: &mut Frames<ChannelReader<'_>>,
    log: &mut dyn LogSink,
    roots: BTreeMap<String, std::path::PathBuf>,
    on_data: &mut dyn FnMut(u64),
) -> Result<Received, RecvError> {
    let first = frames.next();
    frames.flush_stderr(log);
    let tag = first.map_err(|e| match e {
        FrameError::Eof { clean: true } => RecvError::Stream(
            "the agent sent nothing: is nix-hatch installed on the far side (executor key `agent`)?"
                .to_owned(),
        ),
        FrameError::BadTag(t) => RecvError::Stream(format!(
            "the far side did not answer as a nix-hatch agent (first byte 0x{t:02x}; does the login shell print something?)"
        )),
        other => stream_err(other),
    })?;
    let hello = match tag {
        hatch::TAG_HELLO => Hello::decode(&frames.payload).map_err(stream_err)?,
        hatch::TAG_ERROR => return Err(RecvError::Far(lossy(&frames.payload))),
        t => {
            return Err(RecvError::Stream(format!(
                "the far side did not answer as a nix-hatch agent (frame {:?} first)",
                t as char
            )))
        }
    };
    if hello.version != hatch::VERSION {
        return Err(RecvError::Stream(format!(
            "the agent speaks protocol version {}, this nix-hatch speaks {}: install the same nix-hatch on both sides",
            hello.version,
            hatch::VERSION
        )));
    }
    check_temp_dir(&hello.temp_dir).map_err(RecvError::Stream)?;
    let mut digest = Digest::default();
    digest.add(&frames.hdr, &frames.payload);
    let needle = hello.temp_dir.as_bytes().to_vec();
    let unpacker = unpack::Unpacker::new(roots, &needle);

    // This thread reads and decrypts; a second one hashes every frame and
    // unpacks the tar data, so both cores work on the transfer.
    let (tx, rx) = mpsc::sync_channel::<Msg>(8);
    let (pool_tx, pool_rx) = mpsc::channel::<Vec<u8>>();
    let mut transfer_start = None;
    let (mut data_bytes, mut reported) = (0u64, 0u64);
    let mut usage = None;
    let (ended, worker) = std::thread::scope(|s| {
        let worker = s.spawn(move || unpack_worker(rx, pool_tx, digest, unpacker));
        let ended = loop {
            let mut payload = pool_rx
                .try_recv()
                .unwrap_or_else(|_| Vec::with_capacity(MAX_DATA as usize));
            std::mem::swap(&mut payload, &mut frames.payload);
            let tag = frames.next();
            frames.flush_stderr(log);
            let tag = match tag {
                Ok(t) => t,
                Err(e) => break Err(stream_err(e)),
            };
            let mut payload = std::mem::replace(&mut frames.payload, payload);
            match tag {
                hatch::TAG_TRAILER => break Trailer::decode(&payload).map_err(stream_err),
                hatch::TAG_LOG | hatch::TAG_DATA | hatch::TAG_USAGE => {
                    if tag == hatch::TAG_USAGE {
                        match hatch::decode_usage(&payload) {
                            Ok(u) => usage = Some(u),
                            Err(e) => break Err(stream_err(e)),
                        }
                    }
                    let data = tag == hatch::TAG_DATA;
                    if data && transfer_start.is_none() {
                        transfer_start = Some(Instant::now());
                    }
                    if data {
                        data_bytes += payload.len() as u64;
                        if data_bytes - reported >= PROGRESS_STEP || reported == 0 {
                            reported = data_bytes;
                            on_data(data_bytes);
                        }
                    }
                    if tag == hatch::TAG_LOG {
                        log.raw(&payload);
                    }
                    let hdr = frames.hdr;
                    if tx
                        .send(Msg {
                            hdr,
                            payload: std::mem::take(&mut payload),
                            data,
                        })
                        .is_err()
                    {
                        break Err(RecvError::Stream(
                            "the unpacker thread stopped; nothing imported".into(),
                        ));
                    }
                }
                hatch::TAG_ERROR => break Err(RecvError::Far(lossy(&payload))),
                t => {
                    break Err(RecvError::Stream(format!(
                        "corrupted stream: unexpected frame {:?}; nothing imported",
                        t as char
                    )))
                }
            }
        };
        drop(tx);
        (ended, worker.join())
    });
    let worker = worker.map_err(|_| RecvError::Stream("the unpacker thread panicked".into()))?;
    if data_bytes != reported {
        on_data(data_bytes);
    }
    let trailer = ended?;
    let transfer = transfer_start.map(|s| s.elapsed());
    let (digest, bytes) = (worker.digest, worker.bytes);
    if trailer.stream_bytes != bytes || trailer.digest != digest {
        return Err(RecvError::Stream(format!(
            "corrupted stream: received {bytes} bytes with blake3 {}, the agent sent {} bytes with blake3 {}; nothing imported",
            hatch::hex(&digest),
            trailer.stream_bytes,
            hatch::hex(&trailer.digest)
        )));
    }
    if trailer.tar_bytes != worker.tar_bytes {
        return Err(RecvError::Stream(format!(
            "corrupted stream: {} tar bytes received, the agent sent {}; nothing imported",
            worker.tar_bytes, trailer.tar_bytes
        )));
    }
    // The digest matched: a tar error now is the agent's archive, not the
    // transport (only relevant when the command succeeded).
    if trailer.status.success() {
        if let Err(m) = worker.result {
            return Err(RecvError::Stream(format!(
                "unusable output archive: {m}; nothing imported"
            )));
        }
    }
    Ok(Received {
        trailer,
        temp_dir: hello.temp_dir,
        temp_path_hits: worker.temp_path_hits,
        transfer,
        usage,
    })
}

/// Longest far-side temporary directory accepted in the `Hello` (it is
/// searched for in every output byte).
const MAX_TEMP_DIR: usize = 4096;

fn check_temp_dir(t: &str) -> Result<(), String> {
    if !t.starts_with('/') || t.len() > MAX_TEMP_DIR {
        return Err(format!(
            "the agent's temporary directory ({} bytes, {:?}...) is not an absolute path of at most {MAX_TEMP_DIR} bytes; nothing imported",
            t.len(),
            t.chars().take(40).collect::<String>()
        ));
    }
    Ok(())
}

fn lossy(b: &[u8]) -> String {
    crate::util::first_line(&String::from_utf8_lossy(b)).to_owned()
}

/// Length and blake3 of the frames before the trailer.
#[derive(Default)]
struct Digest {
    hasher: blake3::Hasher,
    bytes: u64,
}

impl Digest {
    fn add(&mut self, hdr: &[u8], payload: &[u8]) {
        self.hasher.update(hdr);
        self.hasher.update(payload);
        self.bytes += (hdr.len() + payload.len()) as u64;
    }
}

/// A frame handed to the unpacker thread (every frame before the trailer
/// goes there, in order, for the digest; `data` ones also feed the tar).
struct Msg {
    hdr: [u8; HEADER_LEN],
    payload: Vec<u8>,
    data: bool,
}

struct WorkerResult {
    result: Result<(), String>,
    digest: [u8; 32],
    bytes: u64,
    tar_bytes: u64,
    temp_path_hits: Vec<String>,
}

fn unpack_worker(
    rx: mpsc::Receiver<Msg>,
    pool: mpsc::Sender<Vec<u8>>,
    digest: Digest,
    mut unpacker: unpack::Unpacker<'_>,
) -> WorkerResult {
    let mut src = ChanSource {
        rx,
        pool,
        cur: Vec::new(),
        pos: 0,
        digest,
        tar_bytes: 0,
    };
    let result = (|| {
        // Only start the archive once data comes (a failed command sends
        // none).
        if !src.advance() {
            return Ok(());
        }
        let src = unpacker.unpack(&mut src)?;
        // Whatever follows the archive's end marker, up to the trailer.
        io::copy(src, &mut io::sink())
            .map(|_| ())
            .map_err(|e| e.to_string())
    })();
    // After an error, keep hashing to the end: the digest then tells a
    // corrupted transfer from a bad archive (nothing is imported either way).
    while src.advance() {}
    WorkerResult {
        result,
        digest: *src.digest.hasher.finalize().as_bytes(),
        bytes: src.digest.bytes,
        tar_bytes: src.tar_bytes,
        temp_path_hits: unpacker.temp_path_hits.into_iter().collect(),
    }
}

/// The tar stream, from the frames the reader thread passes on.
struct ChanSource {
    rx: mpsc::Receiver<Msg>,
    pool: mpsc::Sender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    digest: Digest,
    tar_bytes: u64,
}

impl ChanSource {
    /// Takes the next frame; false at the end of the stream.
    fn advance(&mut self) -> bool {
        loop {
            let Ok(m) = self.rx.recv() else {
                return false;
            };
            self.digest.add(&m.hdr, &m.payload);
            if m.data {
                self.tar_bytes += m.payload.len() as u64;
                let old = std::mem::replace(&mut self.cur, m.payload);
                let _ = self.pool.send(old);
                self.pos = 0;
                return true;
            }
            let _ = self.pool.send(m.payload);
        }
    }
}

impl Read for ChanSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.cur.len() {
            if !self.advance() {
                return Ok(0);
            }
        }
        let n = (self.cur.len() - self.pos).min(buf.len());
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Frames as they arrive.
pub struct Frames<R: Read> {
    r: R,
    hdr: [u8; HEADER_LEN],
    payload: Vec<u8>,
}

impl<'a> Frames<ChannelReader<'a>> {
    pub fn new(r: ChannelReader<'a>) -> Self {
        Frames {
            r,
            hdr: [0; HEADER_LEN],
            payload: Vec::with_capacity(MAX_DATA as usize),
        }
    }

    pub fn into_reader(self) -> ChannelReader<'a> {
        self.r
    }

    fn flush_stderr(&mut self, log: &mut dyn LogSink) {
        self.r.flush_stderr(log);
    }
}

impl<R: Read> Frames<R> {
    fn next(&mut self) -> Result<u8, FrameError> {
        let (tag, len) = hatch::read_header(&mut self.r, &mut self.hdr)?;
        hatch::read_payload(&mut self.r, len, &mut self.payload)?;
        Ok(tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_dir_must_be_absolute_and_short() {
        assert!(check_temp_dir("/tmp/nix-hatch-agent.abc123").is_ok());
        assert!(check_temp_dir(&format!("/{}", "a".repeat(MAX_TEMP_DIR - 1))).is_ok());
        for bad in [
            String::new(),
            "tmp/x".to_owned(),
            format!("/{}", "a".repeat(MAX_TEMP_DIR)),
            format!("/{}", "a".repeat(64 << 10)),
        ] {
            let err = check_temp_dir(&bad).unwrap_err();
            assert!(
                err.contains("not an absolute path of at most 4096 bytes"),
                "{err}"
            );
        }
    }
}
