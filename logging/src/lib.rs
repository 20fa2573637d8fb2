//! Log set-up shared by every Resultity binary, so that each has the same flags and the same
//! output:
//!
//! * `--log <FILTER>` (env `RESULTITY_LOG`): tracing's `EnvFilter` syntax; each binary names
//!   its default.
//! * `--log-format text|json` (env `RESULTITY_LOG_FORMAT`): `text` for people, `json` for one
//!   JSON object per line with the event's fields at the top level and the enclosing spans'
//!   fields under `span` and `spans`.
//! * Logs go to stderr, so stdout stays the program's output (an address, a report, YAML).
//! * Colour only when stderr is a terminal and `NO_COLOR` is unset or empty: escape codes in a
//!   file or a log collector are noise.
//! * [`exit_code`] reports the final error in the chosen format, so a JSON log ends with a JSON
//!   line rather than plain text.

use std::ffi::OsStr;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::OnceLock;

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// Environment variable read when `--log` is not given.
pub const FILTER_ENV: &str = "RESULTITY_LOG";
/// Environment variable read when `--log-format` is not given.
pub const FORMAT_ENV: &str = "RESULTITY_LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event for people: time, level, target, message, fields.
    #[default]
    Text,
    /// One JSON object per line, with the span fields (for log collectors).
    Json,
}

/// The log flags, flattened into each binary's top-level command. Global, so they are accepted
/// before or after a subcommand; neither has a clap default (a global argument's default would
/// override a value given before the subcommand), the defaults are applied by [`LogArgs::init`].
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Log filter, tracing's EnvFilter syntax (e.g. `info`, `warn,resultity_sidecar=debug`).
    /// Unset: `info`, or `error` for resultity-devnet and resultity-bench.
    #[arg(
        long = "log",
        env = "RESULTITY_LOG",
        value_name = "FILTER",
        global = true
    )]
    pub filter: Option<String>,
    /// Log line format: `text`, or `json` (one object per line with the span fields). Logs go
    /// to stderr, coloured only on a terminal without NO_COLOR. Unset: text.
    #[arg(
        long,
        env = "RESULTITY_LOG_FORMAT",
        value_enum,
        value_name = "FORMAT",
        global = true
    )]
    pub log_format: Option<LogFormat>,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// `--log` is not a valid filter.
    #[error("invalid log filter \"{filter}\" (--log or RESULTITY_LOG)")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// Something else installed the global subscriber first.
    #[error("a global log subscriber is already installed")]
    AlreadyInstalled,
}

/// The format chosen by [`LogArgs::init`], for [`exit_code`].
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

impl LogArgs {
    /// Installs the global subscriber: stderr, the filter from `--log`/`RESULTITY_LOG` or else
    /// `default_filter`, the chosen format.
    pub fn init(&self, default_filter: &str) -> Result<(), LogError> {
        let format = self.log_format.unwrap_or_default();
        // Recorded before the filter is checked, so a bad filter is reported in this format.
        let _ = FORMAT.set(format);
        let text = self.filter.as_deref().unwrap_or(default_filter);
        let filter = EnvFilter::try_new(text).map_err(|source| LogError::Filter {
            filter: text.to_owned(),
            source,
        })?;
        let ansi = use_ansi(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        );
        tracing_subscriber::registry()
            .with(filter)
            .with(layer(format, ansi, std::io::stderr))
            .try_init()
            .map_err(|_| LogError::AlreadyInstalled)
    }
}

/// Colour only on a terminal, and never when `NO_COLOR` is set to a non-empty value
/// (<https://no-color.org>).
fn use_ansi(terminal: bool, no_color: Option<&OsStr>) -> bool {
    terminal && no_color.is_none_or(OsStr::is_empty)
}

/// The formatting layer for `format`, writing to `writer`.
fn layer<S, W>(format: LogFormat, ansi: bool, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    match format {
        LogFormat::Text => Box::new(fmt.with_ansi(ansi)),
        // Flattened so the message and the event's fields are top-level keys, as collectors
        // expect; `span` is the innermost span, `spans` the whole stack with their fields.
        LogFormat::Json => Box::new(
            fmt.with_ansi(false)
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true),
        ),
    }
}

/// The exit status for `result`; a failure's error is written to stderr once, each cause once
/// (`resultity_protocol::error_chain`): as `error: …` in text, as one JSON line with level
/// `ERROR` when the logs are JSON. Written directly rather than as an event, so that a filter
/// such as `--log off` cannot hide why the program stopped.
pub fn exit_code<E>(result: Result<(), E>) -> ExitCode
where
    E: AsRef<dyn std::error::Error + Send + Sync + 'static>,
{
    match result {
        Err(e) if FORMAT.get() == Some(&LogFormat::Json) => {
            let line = fatal_json_line(&resultity_protocol::error_chain(e.as_ref()));
            // Nothing is left to report a failed write to.
            let _ = writeln!(std::io::stderr().lock(), "{line}");
            ExitCode::FAILURE
        }
        result => resultity_protocol::exit_code(result),
    }
}

/// The final error as a JSON log line with the same keys and timestamp format as the events.
fn fatal_json_line(error: &str) -> String {
    let mut timestamp = String::new();
    // Formatting into a String cannot fail; an empty timestamp would still be valid JSON.
    let _ = SystemTime.format_time(&mut Writer::new(&mut timestamp));
    // Keys in the events' order (a `json!` object would sort them).
    format!(
        r#"{{"timestamp":{},"level":"ERROR","message":{}}}"#,
        serde_json::Value::from(timestamp),
        serde_json::Value::from(error)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report
mod tests {
    use std::ffi::OsStr;
    use std::sync::{Arc, Mutex};

    use clap::Parser;
    use serde_json::Value;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// A writer the tests read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// Logs one event inside two spans with `format` and returns what was written.
    fn log_in_spans(format: LogFormat, ansi: bool) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new("info"))
            .with(layer(format, ansi, move || writer.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let node = tracing::info_span!("node", node_id = "rn1abc");
            let _node = node.enter();
            let job = tracing::info_span!("job", job_id = "j-7", attempt = 2);
            let _job = job.enter();
            tracing::info!(credits = 3, reason = "ready", "assigned");
            tracing::debug!("filtered out");
        });
        out.text()
    }

    #[test]
    fn json_lines_carry_the_event_and_span_fields() {
        let text = log_in_spans(LogFormat::Json, false);
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 1, "{text}");
        let line = &lines[0];
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["message"], "assigned");
        assert_eq!(line["credits"], 3);
        assert_eq!(line["reason"], "ready");
        assert_eq!(line["span"]["name"], "job");
        assert_eq!(line["span"]["job_id"], "j-7");
        assert_eq!(line["span"]["attempt"], 2);
        assert_eq!(line["spans"][0]["node_id"], "rn1abc");
        assert!(line["timestamp"].is_string());
    }

    #[test]
    fn text_lines_are_coloured_only_when_asked() {
        let plain = log_in_spans(LogFormat::Text, false);
        assert!(!plain.contains('\x1b'), "{plain}");
        assert!(plain.contains("node{node_id=\"rn1abc\"}"), "{plain}");
        assert!(plain.contains("assigned credits=3"), "{plain}");
        // The same layer with colour on does write escapes: the check above can fail.
        assert!(log_in_spans(LogFormat::Text, true).contains('\x1b'));
    }

    #[test]
    fn colour_needs_a_terminal_and_no_no_color() {
        assert!(use_ansi(true, None));
        assert!(use_ansi(true, Some(OsStr::new(""))));
        assert!(!use_ansi(true, Some(OsStr::new("1"))));
        assert!(!use_ansi(false, None));
        assert!(!use_ansi(false, Some(OsStr::new(""))));
    }

    #[test]
    fn the_final_error_line_is_json_with_the_event_keys() {
        let line: Value =
            serde_json::from_str(&fatal_json_line("reading key file k: gone")).unwrap();
        assert_eq!(line["level"], "ERROR");
        assert_eq!(line["message"], "reading key file k: gone");
        // Same shape as an event's timestamp: RFC 3339 in UTC.
        let ts = line["timestamp"].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.contains('T'), "{ts}");
        // Quotes and newlines in the error stay inside the one line.
        let tricky = fatal_json_line("bad \"name\"\nnext");
        assert_eq!(tricky.lines().count(), 1);
        let line: Value = serde_json::from_str(&tricky).unwrap();
        assert_eq!(line["message"], "bad \"name\"\nnext");
    }

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
        #[command(subcommand)]
        cmd: Option<Cmd>,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Cmd {
        Serve,
    }

    #[test]
    fn flags_are_accepted_before_or_after_a_subcommand_and_read_the_environment() {
        let before =
            Cli::try_parse_from(["x", "--log", "warn", "--log-format", "json", "serve"]).unwrap();
        let after =
            Cli::try_parse_from(["x", "serve", "--log", "warn", "--log-format", "json"]).unwrap();
        for cli in [before, after] {
            assert_eq!(cli.log.filter.as_deref(), Some("warn"));
            assert_eq!(cli.log.log_format, Some(LogFormat::Json));
        }
        let none = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(none.log.log_format, None);
        assert!(Cli::try_parse_from(["x", "--log-format", "yaml"]).is_err());
        use clap::CommandFactory;
        let cmd = Cli::command();
        let env = |id: &str| {
            cmd.get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_env())
                .map(OsStr::to_owned)
        };
        assert_eq!(env("filter").as_deref(), Some(OsStr::new(FILTER_ENV)));
        assert_eq!(env("log_format").as_deref(), Some(OsStr::new(FORMAT_ENV)));
    }
}
