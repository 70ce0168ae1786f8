//! How keys, values and ttls are shown: text that never mangles bytes, JSON that
//! round-trips them.

use std::fmt::Write as _;

use base64::Engine as _;
use serde_json::{Map, Value};

/// Bytes as text: valid UTF-8 as it is, every other byte as `\xNN`.
pub fn text(bytes: &[u8]) -> String {
    let mut shown = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        shown.push_str(chunk.valid());
        for byte in chunk.invalid() {
            let _ = write!(shown, "\\x{byte:02x}");
        }
    }
    shown
}

/// Bytes as one line of text (`dump`, `watch`): like [`text`], and also every control
/// character and the backslash escaped (`\n`, `\t`, `\r`, `\\`, `\xNN`, `\u{N}`), so
/// that a value can neither break the line nor send the terminal an escape sequence,
/// and the line reads back unambiguously.
pub fn line_text(bytes: &[u8]) -> String {
    let mut shown = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for character in chunk.valid().chars() {
            match character {
                '\\' => shown.push_str("\\\\"),
                '\n' => shown.push_str("\\n"),
                '\t' => shown.push_str("\\t"),
                '\r' => shown.push_str("\\r"),
                control if control.is_control() && u32::from(control) < 0x80 => {
                    let _ = write!(shown, "\\x{:02x}", u32::from(control));
                }
                control if control.is_control() => {
                    let _ = write!(shown, "\\u{{{:x}}}", u32::from(control));
                }
                other => shown.push(other),
            }
        }
        for byte in chunk.invalid() {
            let _ = write!(shown, "\\x{byte:02x}");
        }
    }
    shown
}

/// Adds `bytes` to a JSON object under `name` when they are UTF-8, else base64 under
/// `name_base64`: the marker is in the field's name, so a reader never has to guess.
pub fn put_bytes(object: &mut Map<String, Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            object.insert(name.to_string(), Value::from(text));
        }
        Err(_) => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
            object.insert(format!("{name}_base64"), Value::from(encoded));
        }
    }
}

pub use clonekv_zmq::client::remaining_ttl;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_escapes_only_what_is_not_utf8() {
        assert_eq!(text("snö".as_bytes()), "snö");
        assert_eq!(text(b"a\xff\x00b"), "a\\xff\u{0}b");
        assert_eq!(text(b"\xc3"), "\\xc3");
    }

    #[test]
    fn a_line_escapes_controls_and_backslashes_so_it_stays_one_line() {
        assert_eq!(line_text(b"plain snow"), "plain snow");
        assert_eq!(line_text(b"a\nb\tc\rd"), "a\\nb\\tc\\rd");
        assert_eq!(line_text(b"\x1b[31m"), "\\x1b[31m");
        assert_eq!(line_text(b"back\\slash"), "back\\\\slash");
        assert_eq!(line_text(b"\xff\x00"), "\\xff\\x00");
        assert_eq!(line_text("\u{85}".as_bytes()), "\\u{85}");
    }

    #[test]
    fn json_marks_bytes_that_are_not_utf8_and_they_round_trip() {
        let mut object = Map::new();
        put_bytes(&mut object, "key", b"/k");
        put_bytes(&mut object, "value", b"\xff\xfe\x00");
        assert_eq!(object["key"], "/k");
        assert!(!object.contains_key("value"));
        let encoded = object["value_base64"].as_str().unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(decoded, b"\xff\xfe\x00");
    }
}
