//! nix-hatch's own messages, written through `tracing` (`error!`, `warn!`,
//! `info!`, `debug!`, `trace!`) and delivered the way Nix reads them:
//! before `# accept` as `@nix` message lines on stderr (Nix shows them to
//! the user, through the daemon too), after it as plain `nix-hatch: …`
//! lines in the build log (fd 4, what `nix log` keeps). The builder's own
//! output never passes through here: it stays raw bytes.
//!
//! Nix's verbosity (the hook's last argument) decides what is written:
//! errors, warnings and `info!` at Nix's default, `debug!` from `-v`
//! (talkative), `trace!` from `-vvv` (debug). Inside an `executor` span
//! (`error_span!("executor", name = %name)`) every message starts with
//! `executor "NAME": ` — the one place that prefix is added.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

use super::log::{msg_line_at, nix_level};

/// Nix's default verbosity (`lvlInfo`).
pub const DEFAULT_VERBOSITY: u8 = 3;

/// Where messages go now.
enum Target {
    /// Before `# accept`: `@nix` lines on stderr.
    Nix,
    /// After it: plain lines in the build log.
    BuildLog(File),
    /// Tests: plain lines, every level.
    Capture(Arc<Mutex<String>>),
}

struct NixLayer {
    verbosity: u8,
    target: Arc<Mutex<Target>>,
}

/// The executor name an `executor` span carries.
struct ExecutorName(String);

static TARGET: Mutex<Option<Arc<Mutex<Target>>>> = Mutex::new(None);

/// Installs the subscriber for this process (the hook calls it first
/// thing); messages go to Nix as `@nix` lines until [`to_build_log`].
/// `verbosity` is the hook's last argument (Nix's verbosity level).
pub fn init(verbosity: u8) {
    let target = Arc::new(Mutex::new(Target::Nix));
    let layer = NixLayer {
        verbosity,
        target: Arc::clone(&target),
    };
    if tracing_subscriber::registry()
        .with(layer)
        .try_init()
        .is_ok()
    {
        *TARGET.lock().unwrap_or_else(|e| e.into_inner()) = Some(target);
    }
}

/// From now on messages are lines of the build log `log` (after `#
/// accept`, when stderr only carries `@nix` lines Nix parses).
pub fn to_build_log(log: File) {
    if let Some(t) = TARGET.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        *t.lock().unwrap_or_else(|e| e.into_inner()) = Target::BuildLog(log);
    }
}

/// Runs `f` with every message of this thread captured as plain lines
/// (every level), for tests.
pub fn capture<R>(f: impl FnOnce() -> R) -> (R, String) {
    let text = Arc::new(Mutex::new(String::new()));
    let layer = NixLayer {
        verbosity: u8::MAX,
        target: Arc::new(Mutex::new(Target::Capture(Arc::clone(&text)))),
    };
    let r = tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), f);
    let out = text.lock().unwrap_or_else(|e| e.into_inner()).clone();
    (r, out)
}

/// Nix's verbosity from the hook's arguments (the last one, a number).
pub fn verbosity_of(arg: &str) -> u8 {
    arg.parse::<u32>()
        .map(|v| v.min(u8::MAX as u32) as u8)
        .unwrap_or(DEFAULT_VERBOSITY)
}

impl NixLayer {
    fn wanted(&self, level: &Level) -> bool {
        nix_level(level) <= self.verbosity
    }
}

impl<S> Layer<S> for NixLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn enabled(&self, meta: &tracing::Metadata<'_>, _: Context<'_, S>) -> bool {
        // Spans always (they only name the executor); events by level.
        meta.is_span() || self.wanted(meta.level())
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != "executor" {
            return;
        }
        let mut v = FieldText::default();
        attrs.record(&mut v);
        if let (Some(span), Some(name)) = (ctx.span(id), v.name) {
            span.extensions_mut().insert(ExecutorName(name));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if !self.wanted(&level) {
            return;
        }
        let mut v = FieldText::default();
        event.record(&mut v);
        let mut msg = String::from("nix-hatch: ");
        let executor = ctx.event_scope(event).and_then(|scope| {
            scope
                .from_root()
                .find_map(|s| s.extensions().get::<ExecutorName>().map(|n| n.0.clone()))
        });
        if let Some(name) = executor {
            let _ = write!(msg, "executor {name:?}: ");
        }
        msg.push_str(&v.message);
        msg.push_str(&v.rest);
        let mut target = self.target.lock().unwrap_or_else(|e| e.into_inner());
        // A log that can't be written (Nix went away) must not fail the
        // build by itself; Nix notices on its own.
        let _ = match &mut *target {
            Target::Nix => {
                std::io::stderr().write_all(msg_line_at(nix_level(&level), &msg).as_bytes())
            }
            Target::BuildLog(f) => f.write_all(format!("{msg}\n").as_bytes()),
            Target::Capture(t) => {
                let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                t.push_str(&msg);
                t.push('\n');
                Ok(())
            }
        };
    }
}

/// The text of an event: its message, then any other fields as
/// ` key=value`; for spans, the `name` field.
#[derive(Default)]
struct FieldText {
    message: String,
    rest: String,
    name: Option<String>,
}

impl Visit for FieldText {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "name" => self.name = Some(value.to_owned()),
            other => {
                let _ = write!(self.rest, " {other}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            "name" => self.name = Some(format!("{value:?}")),
            other => {
                let _ = write!(self.rest, " {other}={value:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_the_executors_name_from_its_span() {
        let ((), text) = capture(|| {
            tracing::info!("building /nix/store/x.drv");
            let span = tracing::error_span!("executor", name = %"signer");
            let _in = span.enter();
            tracing::warn!("command failed with exit code {}", 3);
            tracing::debug!(bytes = 12, "detail");
        });
        assert_eq!(
            text,
            "nix-hatch: building /nix/store/x.drv\n\
             nix-hatch: executor \"signer\": command failed with exit code 3\n\
             nix-hatch: executor \"signer\": detail bytes=12\n"
        );
    }

    #[test]
    fn verbosity_decides_what_is_written() {
        let layer = |v| NixLayer {
            verbosity: v,
            target: Arc::new(Mutex::new(Target::Nix)),
        };
        let default = layer(verbosity_of("3"));
        assert!(default.wanted(&Level::ERROR) && default.wanted(&Level::WARN));
        assert!(default.wanted(&Level::INFO));
        assert!(!default.wanted(&Level::DEBUG));
        let v = layer(verbosity_of("4"));
        assert!(v.wanted(&Level::DEBUG) && !v.wanted(&Level::TRACE));
        assert!(layer(verbosity_of("6")).wanted(&Level::TRACE));
        let quiet = layer(verbosity_of("0"));
        assert!(quiet.wanted(&Level::ERROR) && !quiet.wanted(&Level::WARN));
        assert_eq!(verbosity_of("junk"), DEFAULT_VERBOSITY);
    }
}
