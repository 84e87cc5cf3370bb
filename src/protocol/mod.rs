//! Nix's wire format and the messages nix-hatch exchanges with Nix.
//!
//! `wire` is the primitive encoding (u64 little-endian, length-prefixed
//! byte strings padded to 8 bytes, string lists); `hook` the build-hook
//! conversation built from it; `log` the `@nix {json}` lines Nix parses from
//! the hook's stderr after `# accept`; `buildlog` the build log on fd 4 and
//! the [`buildlog::LogSink`] executors write to; `hatch` the framed protocol
//! between the `ssh` executor and `nix-hatch agent`.
//!
//! Errors: one `thiserror` enum per wire format ([`wire::WireError`],
//! [`hook::ProtocolError`], [`hatch::FrameError`]), since callers tell
//! their cases apart (a clean end of stream from a truncated frame, a
//! bad tag from a malformed payload).

pub mod activity;
pub mod buildlog;
pub mod hatch;
pub mod hook;
pub mod log;
pub mod messages;
pub mod wire;
