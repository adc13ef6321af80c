//! JSON log lines written in one pass. An event's fields go straight into its line as they are
//! visited, and a span's fields are kept as a ready JSON fragment from the moment the span is
//! created, so no event builds a map, re-parses its span's fields or has its text checked for
//! UTF-8 a second time. The shape is tracing-subscriber's JSON format with `flatten_event` and
//! `with_current_span`: `timestamp`, `level`, the event's fields, `target`, then `span` (its
//! fields and `name`).
//!
//! Where it parts from tracing-subscriber, nothing the service writes is touched: a span's
//! fields come in the order they were declared (tracing-subscriber sorts them by name; ours
//! are sorted only once a field is recorded after creation, which the service never does), a
//! span field's name keeps a raw identifier's `r#`, and bytes are written as a string of hex
//! digits rather than an array of numbers.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats each event as one JSON object on one line.
#[derive(Debug, Default)]
pub struct JsonLines;

impl<S> FormatEvent<S, SpanFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, SpanFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // A record of the `log` crate carries its own target and level.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        // Written where every push is inlined, then handed over at once.
        let mut line = String::with_capacity(LINE_CAPACITY);
        line.push_str("{\"timestamp\":\"");
        timestamp(&mut line)?;
        line.push_str("\",\"level\":\"");
        line.push_str(meta.level().as_str());
        line.push('"');
        let mut members = Members::after_first(&mut line);
        event.record(&mut members);
        members.result?;
        line.push_str(",\"target\":");
        string(&mut line, meta.target());
        let span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        if let Some(span) = span {
            line.push_str(",\"span\":{");
            if let Some(fields) = span.extensions().get::<FormattedFields<SpanFields>>()
                && !fields.is_empty()
            {
                line.push_str(fields);
                line.push(',');
            }
            line.push_str("\"name\":");
            string(&mut line, span.name());
            line.push('}');
        }
        line.push_str("}\n");
        writer.write_str(&line)
    }
}

/// Appends the time now as RFC 3339 in UTC to the microsecond, as tracing-subscriber's
/// `SystemTime` writes it (`2026-12-02T17:16:08.123456Z`), in one piece.
fn timestamp(line: &mut String) -> fmt::Result {
    let now = std::time::SystemTime::now();
    // Refused only before 1970 or after 9999, which tracing-subscriber's writer handles.
    if now < std::time::UNIX_EPOCH
        || write!(line, "{}", humantime::format_rfc3339_micros(now)).is_err()
    {
        SystemTime.format_time(&mut Writer::new(line))?;
    }
    Ok(())
}

/// Room for a call's line without growing (its audit event passes 512 bytes).
const LINE_CAPACITY: usize = 1024;
/// Room for a call's span's fields without growing.
const SPAN_FIELDS_CAPACITY: usize = 160;

/// A span's fields as the members of a JSON object (`"a":1,"b":"x"`), written once when the
/// span is created and copied into each of its events' lines.
#[derive(Debug, Default)]
pub struct SpanFields;

impl<'w> FormatFields<'w> for SpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut written = String::with_capacity(SPAN_FIELDS_CAPACITY);
        let mut members = Members::first(&mut written);
        fields.record(&mut members);
        members.result?;
        writer.write_str(&written)
    }

    /// Fields recorded after the span was created replace those of the same name: the rare
    /// path (the service records none), so it goes through a map.
    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut added = String::new();
        self.format_fields(Writer::new(&mut added), fields)?;
        if current.is_empty() {
            current.fields = added;
            return Ok(());
        }
        let parse = |members: &str| {
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&format!(
                "{{{members}}}"
            ))
            .map_err(|_| fmt::Error)
        };
        let mut all = parse(&current.fields)?;
        all.extend(parse(&added)?);
        let object = serde_json::to_string(&all).map_err(|_| fmt::Error)?;
        current.fields = object[1..object.len() - 1].to_owned();
        Ok(())
    }
}

/// Writes each visited field as a JSON member, a comma before all but the first.
struct Members<'a> {
    out: &'a mut String,
    first: bool,
    /// The first error of a value's `Debug`.
    result: fmt::Result,
}

impl<'a> Members<'a> {
    fn first(out: &'a mut String) -> Self {
        Self {
            out,
            first: true,
            result: Ok(()),
        }
    }

    fn after_first(out: &'a mut String) -> Self {
        Self {
            first: false,
            ..Self::first(out)
        }
    }

    fn key(&mut self, field: &Field) {
        if !std::mem::take(&mut self.first) {
            self.out.push(',');
        }
        string(self.out, field.name());
        self.out.push(':');
    }
}

impl Visit for Members<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        string(self.out, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    /// As serde_json writes a number: the shortest text that reads back as it; `null` for a
    /// value JSON has no number for.
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        match value.is_finite() {
            true => self.out.push_str(ryu::Buffer::new().format_finite(value)),
            false => self.out.push_str("null"),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field);
        self.out.push('"');
        let written = write!(Escaped(self.out), "{value:?}");
        self.result = self.result.and(written);
        self.out.push('"');
    }
}

/// `text` as a JSON string.
fn string(out: &mut String, text: &str) {
    out.push('"');
    escape(out, text);
    out.push('"');
}

/// For each byte, the character after the backslash that escapes it in a JSON string (`u` for
/// `\u00XX`), or 0 for a byte copied as it is: serde_json's choice of escapes.
static ESCAPES: [u8; 256] = {
    let mut escapes = [0; 256];
    let mut control = 0;
    while control < 0x20 {
        escapes[control] = b'u';
        control += 1;
    }
    escapes[b'"' as usize] = b'"';
    escapes[b'\\' as usize] = b'\\';
    escapes[b'\n' as usize] = b'n';
    escapes[b'\r' as usize] = b'r';
    escapes[b'\t' as usize] = b't';
    escapes[0x08] = b'b';
    escapes[0x0c] = b'f';
    escapes
};

/// Appends `text` escaped for a JSON string.
fn escape(out: &mut String, text: &str) {
    let bytes = text.as_bytes();
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        // Eight bytes at a time while none of them is to be escaped.
        if let Some(word) = bytes.get(i..i + 8)
            && !any_to_escape(u64::from_le_bytes(word.try_into().expect("eight bytes")))
        {
            i += 8;
            continue;
        }
        let byte = bytes[i];
        let escape = ESCAPES[usize::from(byte)];
        if escape != 0 {
            // `i` is at an ASCII byte, so a character boundary.
            out.push_str(&text[start..i]);
            out.push('\\');
            match escape {
                b'u' => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.push_str("u00");
                    out.push(HEX[usize::from(byte >> 4)].into());
                    out.push(HEX[usize::from(byte & 0xf)].into());
                }
                escape => out.push(escape.into()),
            }
            start = i + 1;
        }
        i += 1;
    }
    out.push_str(&text[start..]);
}

/// True when one of the eight bytes of `word` is a control character, a quote or a backslash
/// (the bit tricks of "Bit Twiddling Hacks": a byte below `n`, a byte equal to zero).
fn any_to_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
    let any_below =
        |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGH_BITS != 0;
    let any_equal = |word: u64, n: u8| any_below(word ^ (ONES * u64::from(n)), 1);
    any_below(word, 0x20) || any_equal(word, b'"') || any_equal(word, b'\\')
}

/// Escapes what `Debug` writes through it.
struct Escaped<'a>(&'a mut String);

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        escape(self.0, text);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::Value;
    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Lines written to memory.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Self;
        fn make_writer(&'a self) -> Self {
            self.clone()
        }
    }

    impl Lines {
        /// Each line parsed, its timestamp checked for shape and taken out.
        fn parsed(&self) -> Vec<Value> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines()
                .map(|line| {
                    let mut value: Value = serde_json::from_str(line).expect(line);
                    let timestamp = value.as_object_mut().unwrap().remove("timestamp").unwrap();
                    let timestamp = timestamp.as_str().unwrap();
                    assert!(
                        timestamp.len() == 27 && timestamp.ends_with('Z'),
                        "{timestamp}"
                    );
                    value
                })
                .collect()
        }
    }

    /// Events of every kind of value, inside a span, outside any, and in a span whose fields
    /// are recorded again later.
    fn emit() {
        let text = "quote \" backslash \\ newline \n return \r tab \t nul \0 bell \x07 backspace \x08 form feed \x0c unit \x1f del \x7f é 😀";
        let span = tracing::info_span!(
            "call",
            grpc.method = "ForgotPassword",
            request_id = %"r-1",
            text,
            count = 3u64,
            absent = tracing::field::Empty,
        );
        {
            let _entered = span.enter();
            tracing::info!(
                grpc.code = "OK",
                text,
                negative = -7i64,
                big = u64::MAX,
                latency_ms = 0.1234,
                tiny = 1e-9,
                whole = 2.0,
                infinite = f64::INFINITY,
                nan = f64::NAN,
                yes = true,
                debugged = ?Some("x\"y"),
                shown = %"a\nb",
                "call finished: {}",
                "with \"arguments\""
            );
            tracing::warn!(target: "audit", event = "password_reset.requested", "audit");
        }
        span.record("count", 4u64);
        span.record("absent", "now here");
        span.in_scope(|| tracing::error!("after record"));
        tracing::info!(parent: &span, "explicit parent");
        tracing::info!(parent: None, "no span");
        let empty = tracing::info_span!("empty");
        empty.in_scope(|| tracing::info!("in a span with no fields"));
    }

    proptest::proptest! {
        #[test]
        fn strings_are_escaped_as_serde_json_escapes_them(text in "(?s).{0,40}") {
            let mut ours = String::new();
            string(&mut ours, &text);
            proptest::prop_assert_eq!(ours, serde_json::to_string(&text).unwrap());
        }

        #[test]
        fn strings_of_json_specials_are_escaped_as_serde_json_escapes_them(
            text in "[\\x00-\\x21\"\\\\a-z\u{7f}é😀]{0,40}"
        ) {
            let mut ours = String::new();
            string(&mut ours, &text);
            proptest::prop_assert_eq!(ours, serde_json::to_string(&text).unwrap());
        }
    }

    #[test]
    fn timestamps_are_rfc_3339_to_the_microsecond() {
        let mut line = String::new();
        timestamp(&mut line).unwrap();
        let parsed = humantime::parse_rfc3339(&line).unwrap();
        let age = std::time::SystemTime::now().duration_since(parsed).unwrap();
        assert!(age < std::time::Duration::from_secs(60), "{line}");
        assert_eq!(line.len(), "2026-12-02T17:16:08.123456Z".len(), "{line}");
    }

    #[test]
    fn lines_are_what_tracing_subscribers_json_format_writes() {
        let ours = Lines::default();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(SpanFields)
                .event_format(JsonLines)
                .with_writer(ours.clone()),
        );
        tracing::subscriber::with_default(subscriber, emit);

        let theirs = Lines::default();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(theirs.clone()),
        );
        tracing::subscriber::with_default(subscriber, emit);

        let (ours, theirs) = (ours.parsed(), theirs.parsed());
        assert_eq!(ours.len(), 6);
        assert_eq!(ours, theirs);
        assert_eq!(ours[0]["span"]["text"], ours[0]["text"]);
        assert_eq!(ours[2]["span"]["count"], 4);
        assert_eq!(ours[2]["span"]["absent"], "now here");
    }
}
