//! The key reader every part of the configuration is parsed with: typed
//! access to a TOML table that remembers which keys were read (the rest are
//! reported as unknown), and the configuration's errors: [`Problems`],
//! where each problem is one line, and the [`Problem`] of one value.

use toml::{Table, Value};

/// `"512"`, `"64K"`, `"512M"`, `"10G"`, `"2T"` (powers of 1024; a
/// trailing `B` or `iB` is allowed); `None` for anything else or zero.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last()? {
        (i, 'K' | 'k') => (&t[..i], 10),
        (i, 'M' | 'm') => (&t[..i], 20),
        (i, 'G' | 'g') => (&t[..i], 30),
        (i, 'T' | 't') => (&t[..i], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.trim().parse().ok()?;
    n.checked_mul(1u64 << shift).filter(|&v| v > 0)
}

/// The inverse of [`parse_size`], for people: `4 GiB`, `512 MiB`, `1.5 GiB`, `900 bytes`: exact where the value is a
/// whole number of the unit, else one decimal.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (name, shift) in UNITS {
        let unit = 1u64 << shift;
        if n >= unit {
            return if n % unit == 0 {
                format!("{} {name}", n >> shift)
            } else {
                format!("{:.1} {name}", n as f64 / unit as f64)
            };
        }
    }
    format!("{n} bytes")
}

pub(super) fn one_line(e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_owned();
    match e.span() {
        Some(span) => format!("TOML syntax error at byte {}: {msg}", span.start),
        None => format!("TOML syntax error: {msg}"),
    }
}

pub(super) fn string_list(v: &Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_str().map(str::to_owned))
        .collect()
}

/// Everything wrong with a configuration, one line per problem (the key,
/// then what is wrong), in the order found: `nix-hatch check` lists them,
/// the hook declines with the first. Derefs to the lines.
#[derive(Debug, Default, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct Problems(Vec<String>);

impl Problems {
    pub(super) fn push(&mut self, s: String) {
        self.0.push(s);
    }
}

impl std::ops::Deref for Problems {
    type Target = [String];

    fn deref(&self) -> &[String] {
        &self.0
    }
}

impl IntoIterator for Problems {
    type Item = String;
    type IntoIter = std::vec::IntoIter<String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl From<Vec<String>> for Problems {
    fn from(lines: Vec<String>) -> Self {
        Problems(lines)
    }
}

/// What is wrong with one value (a bind, a rule, a regex), one line; the
/// caller names the key in front of it when it becomes one of the
/// [`Problems`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Problem(pub String);

/// Typed access to a table that remembers which keys were read, so the
/// rest can be reported as unknown.
pub(super) struct Keys<'a> {
    table: &'a Table,
    ctx: String,
    seen: Vec<&'static str>,
}

impl<'a> Keys<'a> {
    pub(super) fn new(table: &'a Table, ctx: &str) -> Self {
        Keys {
            table,
            ctx: ctx.to_owned(),
            seen: Vec::new(),
        }
    }

    fn key(&self, key: &str) -> String {
        if self.ctx.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.ctx)
        }
    }

    pub(super) fn seen(&mut self, key: &'static str) {
        self.seen.push(key);
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.seen.push(key);
        self.table.get(key)
    }

    /// The raw value of `key` (marked as read), for structured keys.
    pub(super) fn value(&mut self, key: &'static str) -> Option<&'a Value> {
        self.get(key)
    }

    pub(super) fn string(&mut self, p: &mut Problems, key: &'static str) -> Option<String> {
        match self.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                p.push(format!(
                    "{}: expected a string, got {}",
                    self.key(key),
                    other.type_str()
                ));
                None
            }
        }
    }

    pub(super) fn uint(&mut self, p: &mut Problems, key: &'static str) -> Option<u64> {
        match self.get(key)? {
            Value::Integer(i) if *i >= 0 => Some(*i as u64),
            other => {
                p.push(format!(
                    "{}: expected a non-negative integer, got {other}",
                    self.key(key)
                ));
                None
            }
        }
    }

    /// A size in bytes: an integer, or a string with a K, M, G or T suffix
    /// (powers of 1024), e.g. `"10G"`.
    pub(super) fn size(&mut self, p: &mut Problems, key: &'static str) -> Option<u64> {
        let parsed = match self.get(key)? {
            Value::Integer(i) if *i > 0 => Some(*i as u64),
            Value::String(s) => parse_size(s),
            _ => None,
        };
        if parsed.is_none() {
            p.push(format!(
                "{}: expected a size in bytes, a positive integer or a string like \"512M\" or \"10G\"",
                self.key(key)
            ));
        }
        parsed
    }

    /// A number, integer or not (`0.5`, `2`).
    pub(super) fn number(&mut self, p: &mut Problems, key: &'static str) -> Option<f64> {
        match self.get(key)? {
            Value::Integer(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            other => {
                p.push(format!(
                    "{}: expected a number, got {}",
                    self.key(key),
                    other.type_str()
                ));
                None
            }
        }
    }

    pub(super) fn bool(&mut self, p: &mut Problems, key: &'static str) -> Option<bool> {
        match self.get(key)? {
            Value::Boolean(b) => Some(*b),
            other => {
                p.push(format!(
                    "{}: expected true or false, got {other}",
                    self.key(key)
                ));
                None
            }
        }
    }

    pub(super) fn string_list(
        &mut self,
        p: &mut Problems,
        key: &'static str,
    ) -> Option<Vec<String>> {
        let v = self.get(key)?;
        match string_list(v) {
            Some(l) => Some(l),
            None => {
                p.push(format!("{}: expected a list of strings", self.key(key)));
                None
            }
        }
    }

    pub(super) fn table(&mut self, p: &mut Problems, key: &'static str) -> Option<&'a Table> {
        match self.get(key)? {
            Value::Table(t) => Some(t),
            other => {
                p.push(format!(
                    "{}: expected a table, got {}",
                    self.key(key),
                    other.type_str()
                ));
                None
            }
        }
    }

    pub(super) fn finish(self, p: &mut Problems) {
        for k in self.table.keys() {
            if !self.seen.contains(&k.as_str()) {
                p.push(format!("{}: unknown key", self.key(k)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G"), Some(10 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("64KiB"), Some(64 << 10));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("2TB"), Some(2 << 40));
        for bad in ["", "G", "-1G", "1.5G", "0", "10X", "99999999999T"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        let c =
            parse("[executors.a]\nkind = \"host\"\ncommand = [\"/x\"]\nmax-output-size = \"1G\"\n")
                .unwrap();
        assert_eq!(c.executors["a"].max_output_size, Some(1 << 30));
        let errs = parse(
            "[executors.a]\nkind = \"host\"\ncommand = [\"/x\"]\nmax-output-size = \"lots\"\n",
        )
        .unwrap_err();
        assert!(
            errs[0].contains("max-output-size: expected a size"),
            "{errs:?}"
        );
    }
}
