//! The build-hook conversation (Nix's `HookInstance` / `tryBuildHook`).
//!
//! Nix writes settings `(1, name, value)… 0`, then any number of
//! `"try", am-willing, system, drv path, required features`. The hook answers
//! each `try` with one `# <reply>` line on stderr. After `# accept` it writes
//! one line naming the machine, then reads the input closure and the wanted
//! outputs (string lists); Nix then closes the stream.

use std::collections::HashMap;
use std::io::{Read, Write};

use super::wire::{self, WireError};

/// Nix's settings as it sent them (name → value).
#[derive(Debug, Default, Clone)]
pub struct Settings {
    values: HashMap<String, String>,
}

impl Settings {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    pub fn set(&mut self, name: &str, value: &str) {
        self.values.insert(name.to_owned(), value.to_owned());
    }

    /// A numeric setting; unset, empty or unparsable counts as 0 (Nix's
    /// "no limit" for `timeout` and `max-silent-time`).
    pub fn u64_or_zero(&self, name: &str) -> u64 {
        self.get(name)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("malformed message from Nix: {0}")]
    Wire(WireError),
    /// Something other than `try` where a command was expected.
    #[error("unexpected command from Nix: {0:?} (expected \"try\")")]
    UnknownCommand(String),
    /// The settings block had a tag other than 0 or 1.
    #[error("malformed settings from Nix: tag {0}, expected 0 or 1")]
    BadSettingsTag(u64),
}

// Not `#[from]`: the wire error is part of the message, not a cause
// reported again below it.
impl From<WireError> for ProtocolError {
    fn from(e: WireError) -> Self {
        ProtocolError::Wire(e)
    }
}

pub fn read_settings(r: &mut impl Read) -> Result<Settings, ProtocolError> {
    let mut settings = Settings::default();
    loop {
        match wire::read_u64(r, "the settings")? {
            0 => return Ok(settings),
            1 => {
                let name = wire::read_string(r, "a setting name")?;
                let value = wire::read_string(r, "a setting value")?;
                settings.values.insert(name, value);
            }
            tag => return Err(ProtocolError::BadSettingsTag(tag)),
        }
    }
}

/// One `try` from Nix.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TryRequest {
    /// Whether Nix could build it locally right now (a free local slot).
    pub am_willing: bool,
    pub system: String,
    pub drv_path: String,
    pub required_features: Vec<String>,
}

/// Reusable buffers for reading `try` requests: after the first few
/// messages, reading one allocates nothing.
#[derive(Default)]
pub struct CommandReader {
    word: Vec<u8>,
    req: TryRequest,
    spare: Vec<String>,
}

impl CommandReader {
    /// The next `try`, or `None` when Nix closed the stream between commands.
    /// The request borrows the reader's buffers until the next call.
    pub fn next(&mut self, r: &mut impl Read) -> Result<Option<&TryRequest>, ProtocolError> {
        let Some(len) = wire::read_u64_or_eof(r, "a command")? else {
            return Ok(None);
        };
        // Re-assemble the string whose length we already consumed.
        if len > 64 {
            return Err(WireError::TooLong {
                what: "a command",
                len,
            }
            .into());
        }
        self.word.clear();
        self.word.resize(len as usize + wire::padding(len), 0);
        r.read_exact(&mut self.word).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                WireError::Truncated("a command")
            } else {
                WireError::Io(e)
            }
        })?;
        let word = &self.word[..len as usize];
        if self.word[len as usize..].iter().any(|&b| b != 0) {
            return Err(WireError::BadPadding("a command").into());
        }
        if word != b"try" {
            return Err(ProtocolError::UnknownCommand(
                String::from_utf8_lossy(word).into_owned(),
            ));
        }
        let req = &mut self.req;
        req.am_willing = wire::read_u64(r, "am-willing")? != 0;
        wire::read_string_into(r, &mut req.system, "the system")?;
        wire::read_string_into(r, &mut req.drv_path, "the derivation path")?;
        wire::read_string_list_into(
            r,
            &mut req.required_features,
            &mut self.spare,
            "the required features",
        )?;
        Ok(Some(&self.req))
    }
}

/// What follows `# accept`: the input closure and the outputs Nix wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedJob {
    pub inputs: Vec<String>,
    /// Output names (Nix ≥ 2.4); older Nix sent store paths — the caller maps
    /// those back to names.
    pub wanted_outputs: Vec<String>,
}

pub fn read_accepted_job(r: &mut impl Read) -> Result<AcceptedJob, ProtocolError> {
    let inputs = wire::read_string_list(r, "the input closure")?;
    let wanted_outputs = wire::read_string_list(r, "the wanted outputs")?;
    Ok(AcceptedJob {
        inputs,
        wanted_outputs,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Accept,
    Decline,
    Postpone,
    /// Nix stops asking this hook for the rest of its run.
    DeclinePermanently,
}

impl Reply {
    pub fn line(self) -> &'static [u8] {
        match self {
            Reply::Accept => b"# accept\n",
            Reply::Decline => b"# decline\n",
            Reply::Postpone => b"# postpone\n",
            Reply::DeclinePermanently => b"# decline-permanently\n",
        }
    }

    /// Parses a reply line of another hook (fallback delegation).
    pub fn parse(line: &str) -> Option<Reply> {
        match line.trim_end_matches('\n').strip_prefix("# ")? {
            "accept" => Some(Reply::Accept),
            "decline" => Some(Reply::Decline),
            "postpone" => Some(Reply::Postpone),
            "decline-permanently" => Some(Reply::DeclinePermanently),
            _ => None,
        }
    }
}

/// Writes a reply as one `write` so concurrent stderr users cannot split it.
pub fn write_reply(w: &mut impl Write, reply: Reply) -> std::io::Result<()> {
    w.write_all(reply.line())?;
    w.flush()
}

/// Test and fallback helper: encodes what Nix sends.
pub mod encode {
    use super::super::wire;
    use std::io::Write;

    pub fn settings(w: &mut impl Write, items: &[(&str, &str)]) -> std::io::Result<()> {
        for (k, v) in items {
            wire::write_u64(w, 1)?;
            wire::write_bytes(w, k.as_bytes())?;
            wire::write_bytes(w, v.as_bytes())?;
        }
        wire::write_u64(w, 0)
    }

    pub fn try_request(w: &mut impl Write, req: &super::TryRequest) -> std::io::Result<()> {
        wire::write_bytes(w, b"try")?;
        wire::write_u64(w, req.am_willing as u64)?;
        wire::write_bytes(w, req.system.as_bytes())?;
        wire::write_bytes(w, req.drv_path.as_bytes())?;
        wire::write_string_list(w, &req.required_features)
    }

    pub fn accepted_job(w: &mut impl Write, job: &super::AcceptedJob) -> std::io::Result<()> {
        wire::write_string_list(w, &job.inputs)?;
        wire::write_string_list(w, &job.wanted_outputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_try() -> TryRequest {
        TryRequest {
            am_willing: true,
            system: "x86_64-linux".into(),
            drv_path: "/nix/store/rb9irggdbdc3n1k6d0y3rg9z6j8j3fji-esc.drv".into(),
            required_features: vec!["escape-x".into(), "kvm".into()],
        }
    }

    #[test]
    fn settings_then_tries_then_eof() {
        let mut buf = Vec::new();
        encode::settings(&mut buf, &[("cores", "2"), ("builders", "")]).unwrap();
        encode::try_request(&mut buf, &sample_try()).unwrap();
        encode::try_request(&mut buf, &sample_try()).unwrap();
        let mut r = &buf[..];
        let s = read_settings(&mut r).unwrap();
        assert_eq!(s.get("cores"), Some("2"));
        assert_eq!(s.get("builders"), Some(""));
        assert_eq!(s.u64_or_zero("timeout"), 0);
        let mut cr = CommandReader::default();
        assert_eq!(cr.next(&mut r).unwrap(), Some(&sample_try()));
        assert_eq!(cr.next(&mut r).unwrap(), Some(&sample_try()));
        assert_eq!(cr.next(&mut r).unwrap(), None);
    }

    #[test]
    fn reused_buffers_hold_only_the_current_request() {
        let mut buf = Vec::new();
        let mut small = sample_try();
        small.system = "i686-linux".into();
        small.drv_path = "/nix/store/x.drv".into();
        small.required_features = vec!["f".into()];
        let mut none = sample_try();
        none.required_features.clear();
        for req in [&sample_try(), &small, &none, &sample_try()] {
            encode::try_request(&mut buf, req).unwrap();
        }
        let mut r = &buf[..];
        let mut cr = CommandReader::default();
        assert_eq!(cr.next(&mut r).unwrap(), Some(&sample_try()));
        assert_eq!(cr.next(&mut r).unwrap(), Some(&small));
        assert_eq!(cr.next(&mut r).unwrap(), Some(&none));
        assert_eq!(cr.next(&mut r).unwrap(), Some(&sample_try()));
        assert_eq!(cr.next(&mut r).unwrap(), None);
    }

    #[test]
    fn every_truncation_is_an_error_except_at_command_boundaries() {
        let mut buf = Vec::new();
        encode::try_request(&mut buf, &sample_try()).unwrap();
        for cut in 1..buf.len() {
            let mut r = &buf[..cut];
            let err = CommandReader::default().next(&mut r).unwrap_err();
            assert!(
                matches!(err, ProtocolError::Wire(WireError::Truncated(_))),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn unknown_command_is_named() {
        let mut buf = Vec::new();
        wire::write_bytes(&mut buf, b"build").unwrap();
        let err = CommandReader::default().next(&mut &buf[..]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unexpected command from Nix: \"build\" (expected \"try\")"
        );
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic sweep; the fuzz targets go further.
        let mut seed = 0x9e3779b97f4a7c15u64;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed % 7) as u8 // small values look like plausible lengths
                })
                .collect();
            let mut r = &bytes[..];
            let _ = read_settings(&mut r).and_then(|_| {
                let mut cr = CommandReader::default();
                while cr.next(&mut r)?.is_some() {}
                Ok(())
            });
        }
    }

    #[test]
    fn bad_settings_tag() {
        let mut buf = Vec::new();
        wire::write_u64(&mut buf, 7).unwrap();
        assert!(matches!(
            read_settings(&mut &buf[..]),
            Err(ProtocolError::BadSettingsTag(7))
        ));
    }

    #[test]
    fn replies() {
        assert_eq!(Reply::Accept.line(), b"# accept\n");
        assert_eq!(Reply::parse("# postpone\n"), Some(Reply::Postpone));
        assert_eq!(
            Reply::parse("# decline-permanently"),
            Some(Reply::DeclinePermanently)
        );
        assert_eq!(Reply::parse("accept"), None);
    }

    #[test]
    fn accepted_job_roundtrip() {
        let job = AcceptedJob {
            inputs: vec!["/nix/store/aaa-x".into()],
            wanted_outputs: vec!["dev".into(), "out".into()],
        };
        let mut buf = Vec::new();
        encode::accepted_job(&mut buf, &job).unwrap();
        assert_eq!(read_accepted_job(&mut &buf[..]).unwrap(), job);
    }
}
