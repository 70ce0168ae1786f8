//! kvmsg: the CHP wire codec (PROTOCOL.md §2, §3, §5).
//!
//! Every CHP message except ICANHAZ? and the Binary Star state frame is five frames:
//!
//! | # | field      | bytes                                              |
//! |---|------------|----------------------------------------------------|
//! | 0 | key        | raw bytes                                          |
//! | 1 | sequence   | exactly 8 bytes, signed 64-bit big-endian          |
//! | 2 | uuid       | exactly 16 bytes, or empty                         |
//! | 3 | properties | `name=value\n` records; empty frame = none         |
//! | 4 | body       | raw bytes; empty body means delete                 |
//!
//! [`KvMsg::decode`] never panics, checks every size against [`Limits`] before it copies
//! anything, and returns a [`DecodeError`] that names what is wrong. The caller counts
//! the error by [`DecodeError::reason`], logs it and drops the message: malformed network
//! input is never fatal.
//!
//! ```
//! use clonekv_core::kvmsg::{KvMsg, Limits, Uuid};
//!
//! let set = KvMsg::kvset(b"/weather/london".to_vec(), b"rain".to_vec(), Uuid::from_bytes([7; 16]));
//! let frames = set.encode();
//! let back = KvMsg::decode(&frames, &Limits::default()).unwrap();
//! assert_eq!(back, set);
//! ```

use std::fmt;
use std::time::Duration;

use crate::time::EpochMillis;

/// Number of frames in a kvmsg.
pub const FRAME_COUNT: usize = 5;
/// Key of the heartbeat message.
pub const HUGZ: &[u8] = b"HUGZ";
/// Key of the message that ends a snapshot reply.
pub const KTHXBAI: &[u8] = b"KTHXBAI";
/// First frame of a snapshot request.
pub const ICANHAZ: &[u8] = b"ICANHAZ?";
/// Name of the ttl property (§5).
pub const TTL: &str = "ttl";
/// Name of the property in which a server marks its HUGZ with its Binary Star state
/// (`state=active`, `state=passive`, ...). Reference clients ignore HUGZ properties.
pub const STATE: &str = "state";
/// Name of the HUGZ property that carries the number of keys in the server's map.
pub const KEYS: &str = "keys";
/// Name of the KTHXBAI property in which a clonekv server names the history its map
/// belongs to (PROTOCOL.md §13): the reigns that numbered it, oldest first, as
/// `<id hex>@<base sequence>` separated by commas. Reference programs ignore it.
pub const HISTORY: &str = "history";
/// Name of the KTHXBAI property that marks the end of a resume reply (PROTOCOL.md §13)
/// with the sequence the reply's changes follow. A passive installs a reply only as what
/// it was: resumed changes with this mark, snapshot entries without it.
pub const RESUMED: &str = "resumed";

/// A ttl value this large (or larger) is absolute Unix epoch milliseconds (§5).
const EPOCH_MILLIS_THRESHOLD: u64 = 100_000_000_000;
/// A ttl value with a `.` this large (or larger) is absolute epoch seconds: the Python
/// reference server stores `time.time() + ttl` as `%f`.
const EPOCH_SECONDS_THRESHOLD: u64 = 1_000_000_000;
/// Longest ttl text we parse; the longest meaningful one (`%f` of epoch seconds) is ~18.
const MAX_TTL_TEXT: usize = 40;

/// Size limits applied by the decoder. Defaults from PROTOCOL.md §2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest key (and ICANHAZ? subtree) accepted, in bytes. Keys are at least 1 byte.
    pub max_key_len: usize,
    /// Largest body accepted, in bytes.
    pub max_body_len: usize,
    /// Largest properties frame accepted, in bytes.
    pub max_properties_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_len: 255,
            max_body_len: 1 << 20,
            max_properties_len: 4 << 10,
        }
    }
}

/// Why a sequence of frames is not a valid message. Each variant is one class of
/// malformed input from PROTOCOL.md §2–§3.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message has the wrong number of frames.
    #[error("expected {expected} frames, got {actual}")]
    FrameCount {
        /// Frames the message kind has.
        expected: usize,
        /// Frames received.
        actual: usize,
    },
    /// The key frame is empty.
    #[error("key is empty")]
    EmptyKey,
    /// The key frame is longer than the configured limit.
    #[error("key is {len} bytes, limit is {max}")]
    KeyTooLong {
        /// Length received.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// The sequence frame is not exactly 8 bytes.
    #[error("sequence frame is {len} bytes, must be exactly 8")]
    SequenceLength {
        /// Length received.
        len: usize,
    },
    /// The uuid frame is neither empty nor exactly 16 bytes.
    #[error("uuid frame is {len} bytes, must be 16 or empty")]
    UuidLength {
        /// Length received.
        len: usize,
    },
    /// A properties record is malformed.
    #[error("property record {record} {problem}")]
    PropertyRecord {
        /// Zero-based index of the bad record in the frame.
        record: usize,
        /// What is wrong with it.
        problem: PropertyProblem,
    },
    /// The properties frame is longer than the configured limit.
    #[error("properties frame is {len} bytes, limit is {max}")]
    PropertiesTooLarge {
        /// Length received.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// The body frame is longer than the configured limit.
    #[error("body is {len} bytes, limit is {max}")]
    BodyTooLarge {
        /// Length received.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// A two-frame request whose first frame is not `ICANHAZ?`.
    #[error("unknown command (first frame is not ICANHAZ?)")]
    UnknownCommand,
    /// The subtree of an ICANHAZ? is longer than the key limit.
    #[error("subtree is {len} bytes, limit is {max}")]
    SubtreeTooLong {
        /// Length received.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// A Binary Star state frame that is not `1`..`4`.
    #[error("invalid Binary Star state frame")]
    InvalidState,
    /// The third frame of an ICANHAZ? (a resume position) is not 16 bytes, or comes
    /// with a subtree.
    #[error("resume frame must be 16 bytes after an empty subtree")]
    BadResumeFrame,
}

impl DecodeError {
    /// A short, stable identifier of the error class, for counters and log fields.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::FrameCount { .. } => "frame_count",
            DecodeError::EmptyKey => "empty_key",
            DecodeError::KeyTooLong { .. } => "key_too_long",
            DecodeError::SequenceLength { .. } => "sequence_length",
            DecodeError::UuidLength { .. } => "uuid_length",
            DecodeError::PropertyRecord { .. } => "property_record",
            DecodeError::PropertiesTooLarge { .. } => "properties_too_large",
            DecodeError::BodyTooLarge { .. } => "body_too_large",
            DecodeError::UnknownCommand => "unknown_command",
            DecodeError::SubtreeTooLong { .. } => "subtree_too_long",
            DecodeError::InvalidState => "invalid_state",
            DecodeError::BadResumeFrame => "bad_resume_frame",
        }
    }
}

/// What is wrong with one `name=value` record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PropertyProblem {
    /// The record has no `=`.
    #[error("has no '='")]
    MissingEquals,
    /// The record starts with `=`.
    #[error("has an empty name")]
    EmptyName,
}

/// Why a property cannot be set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PropertyError {
    /// Names are non-empty and contain neither `=` nor `\n`.
    #[error("property name must be non-empty and contain neither '=' nor newline")]
    InvalidName,
    /// Values cannot contain `\n`.
    #[error("property value must not contain a newline")]
    InvalidValue,
}

/// Why a `ttl` property cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TtlError {
    /// Not a non-negative decimal number of seconds (`30`, `1.5`).
    #[error("ttl is not a non-negative decimal number of seconds")]
    NotANumber,
    /// Too large to represent.
    #[error("ttl is too large")]
    Overflow,
}

/// A 16-byte update identifier, chosen at random by the client that made the update.
/// Ordered as its bytes are (lexicographically), compared as one big-endian integer:
/// servers look uuids up in ordered maps on every update, and two integer comparisons
/// are far cheaper than a `memcmp` call.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Uuid([u8; 16]);

impl Ord for Uuid {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        u128::from_be_bytes(self.0).cmp(&u128::from_be_bytes(other.0))
    }
}

impl PartialOrd for Uuid {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Uuid {
    /// The uuid with these bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Uuid(bytes)
    }

    /// The uuid's bytes, as sent on the wire.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The properties frame: ordered `name=value` records.
///
/// Stored as the encoded frame itself (always ending in `\n` when non-empty): a server
/// relays properties untouched far more often than it reads them, and one small buffer
/// per stored entry is the cheapest representation.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Properties {
    encoded: Vec<u8>,
}

impl Properties {
    /// No properties.
    pub const fn new() -> Self {
        Properties {
            encoded: Vec::new(),
        }
    }

    /// Parses a properties frame. A final record without its `\n` is accepted.
    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        validate_properties(frame)?;
        Ok(Properties::from_valid_frame(frame))
    }

    /// Properties from a frame that was validated before, normalised to end in `\n`.
    pub(crate) fn from_valid_frame(frame: &[u8]) -> Self {
        if frame.is_empty() {
            // No allocation for the common case: most updates carry no properties.
            return Properties::new();
        }
        let body = frame.strip_suffix(b"\n").unwrap_or(frame);
        let mut encoded = Vec::with_capacity(body.len() + 1);
        encoded.extend_from_slice(body);
        encoded.push(b'\n');
        Properties { encoded }
    }

    /// The frame as sent on the wire.
    pub fn as_frame(&self) -> &[u8] {
        &self.encoded
    }

    /// True when there are no records.
    pub fn is_empty(&self) -> bool {
        self.encoded.is_empty()
    }

    /// The records in order, as `(name, value)`.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        records(&self.encoded)
    }

    /// The value of the first record named `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        property(&self.encoded, name)
    }

    /// Sets `name` to `value`: replaces the first record of that name in place, or
    /// appends a new record.
    pub fn set(&mut self, name: &str, value: &[u8]) -> Result<(), PropertyError> {
        if name.is_empty() || name.contains(['=', '\n']) {
            return Err(PropertyError::InvalidName);
        }
        if value.contains(&b'\n') {
            return Err(PropertyError::InvalidValue);
        }
        let mut rebuilt = Vec::with_capacity(self.encoded.len() + name.len() + value.len() + 2);
        let mut replaced = false;
        for (record_name, record_value) in self.iter() {
            rebuilt.extend_from_slice(record_name);
            rebuilt.push(b'=');
            if !replaced && record_name == name.as_bytes() {
                rebuilt.extend_from_slice(value);
                replaced = true;
            } else {
                rebuilt.extend_from_slice(record_value);
            }
            rebuilt.push(b'\n');
        }
        if !replaced {
            rebuilt.extend_from_slice(name.as_bytes());
            rebuilt.push(b'=');
            rebuilt.extend_from_slice(value);
            rebuilt.push(b'\n');
        }
        self.encoded = rebuilt;
        Ok(())
    }

    /// Removes every record named `name`.
    pub fn remove(&mut self, name: &str) {
        let mut rebuilt = Vec::with_capacity(self.encoded.len());
        for (record_name, record_value) in self.iter() {
            if record_name != name.as_bytes() {
                rebuilt.extend_from_slice(record_name);
                rebuilt.push(b'=');
                rebuilt.extend_from_slice(record_value);
                rebuilt.push(b'\n');
            }
        }
        self.encoded = rebuilt;
    }
}

/// Checks a properties frame (§2): every record is `name=value` with a non-empty name;
/// a final record without its `\n` is accepted.
fn validate_properties(frame: &[u8]) -> Result<(), DecodeError> {
    if frame.is_empty() {
        return Ok(());
    }
    let body = frame.strip_suffix(b"\n").unwrap_or(frame);
    for (record, line) in body.split(|&byte| byte == b'\n').enumerate() {
        match line.iter().position(|&byte| byte == b'=') {
            None => {
                return Err(DecodeError::PropertyRecord {
                    record,
                    problem: PropertyProblem::MissingEquals,
                })
            }
            Some(0) => {
                return Err(DecodeError::PropertyRecord {
                    record,
                    problem: PropertyProblem::EmptyName,
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The records of a properties frame, in order, as `(name, value)`.
fn records(frame: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
    let body = frame.strip_suffix(b"\n").unwrap_or(frame);
    body.split(|&byte| byte == b'\n')
        .filter(|line| !line.is_empty())
        .filter_map(split_record)
}

/// The value of the first record named `name` in a properties frame.
fn property<'a>(frame: &'a [u8], name: &str) -> Option<&'a [u8]> {
    records(frame)
        .find(|(record_name, _)| *record_name == name.as_bytes())
        .map(|(_, value)| value)
}

/// The state a HUGZ's `state` property names; unknown text names none.
fn state_mark(text: &[u8]) -> Option<BstarState> {
    match text {
        b"primary" => Some(BstarState::Primary),
        b"backup" => Some(BstarState::Backup),
        b"active" => Some(BstarState::Active),
        b"passive" => Some(BstarState::Passive),
        _ => None,
    }
}

impl Properties {
    /// Sets `ttl` to an absolute expiry in epoch milliseconds (the stored form).
    pub(crate) fn set_ttl_expires_at(&mut self, expires_at: EpochMillis) {
        // Digits are always a valid value.
        if self.set(TTL, expires_at.0.to_string().as_bytes()).is_err() {
            debug_assert!(false, "ttl {expires_at:?} rejected");
        }
    }
}

fn split_record(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let equals = line.iter().position(|&byte| byte == b'=')?;
    let (name, rest) = line.split_at(equals);
    Some((name, rest.get(1..).unwrap_or_default()))
}

impl fmt::Debug for Properties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.iter().map(|(name, value)| {
                (
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(value),
                )
            }))
            .finish()
    }
}

/// A ttl as read from a peer server's message (§5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ttl {
    /// Expires this long after it is applied (as clients send it, and in KVPUBs).
    Relative(Duration),
    /// Expires at this wall-clock time (as servers store it and send it in KVSYNCs).
    ExpiresAt(EpochMillis),
}

/// A parsed non-negative decimal: integer part, fraction in milliseconds, whether a `.`
/// was present.
struct Decimal {
    whole: u64,
    fraction_millis: u64,
    has_point: bool,
}

fn parse_decimal(text: &[u8]) -> Result<Decimal, TtlError> {
    if text.is_empty() || text.len() > MAX_TTL_TEXT {
        return Err(TtlError::NotANumber);
    }
    let (whole_digits, fraction_digits, has_point) =
        match text.iter().position(|&byte| byte == b'.') {
            Some(point) => {
                let (whole, rest) = text.split_at(point);
                (whole, rest.get(1..).unwrap_or_default(), true)
            }
            None => (text, &[][..], false),
        };
    let all_digits = |digits: &[u8]| digits.iter().all(u8::is_ascii_digit);
    if whole_digits.is_empty() && fraction_digits.is_empty()
        || !all_digits(whole_digits)
        || !all_digits(fraction_digits)
    {
        return Err(TtlError::NotANumber);
    }
    let mut whole: u64 = 0;
    for &digit in whole_digits {
        whole = whole
            .checked_mul(10)
            .and_then(|value| value.checked_add(u64::from(digit - b'0')))
            .ok_or(TtlError::Overflow)?;
    }
    // Milliseconds are the finest grain the protocol uses; further digits are dropped.
    let mut fraction_millis = 0;
    for position in 0..3 {
        let digit = fraction_digits
            .get(position)
            .map_or(0, |&d| u64::from(d - b'0'));
        fraction_millis = fraction_millis * 10 + digit;
    }
    Ok(Decimal {
        whole,
        fraction_millis,
        has_point,
    })
}

impl Decimal {
    fn as_duration(&self) -> Duration {
        Duration::from_secs(self.whole) + Duration::from_millis(self.fraction_millis)
    }

    fn is_zero(&self) -> bool {
        self.whole == 0 && self.fraction_millis == 0
    }
}

/// Formats a ttl duration the way clients send it: whole seconds, with a fraction only
/// when the duration has one (`30`, `1.5`).
pub fn format_ttl_seconds(ttl: Duration) -> String {
    let millis = ttl.subsec_millis();
    if millis == 0 {
        ttl.as_secs().to_string()
    } else {
        let fraction = format!("{millis:03}");
        format!("{}.{}", ttl.as_secs(), fraction.trim_end_matches('0'))
    }
}

/// One CHP message of five frames: KVSET, KVPUB, KVSYNC, KTHXBAI or HUGZ.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct KvMsg {
    /// Frame 0: the key (or `HUGZ` / `KTHXBAI`).
    pub key: Vec<u8>,
    /// Frame 1: the sequence number (0 in a KVSET).
    pub sequence: i64,
    /// Frame 2: the update's uuid, if any.
    pub uuid: Option<Uuid>,
    /// Frame 3: the properties.
    pub properties: Properties,
    /// Frame 4: the value; empty means delete.
    pub body: Vec<u8>,
}

impl KvMsg {
    /// A KVSET: a client's update, sequence 0. An empty `value` deletes the key.
    pub fn kvset(key: Vec<u8>, value: Vec<u8>, uuid: Uuid) -> Self {
        KvMsg {
            key,
            sequence: 0,
            uuid: Some(uuid),
            properties: Properties::new(),
            body: value,
        }
    }

    /// A KVSET that deletes `key`.
    pub fn kvset_delete(key: Vec<u8>, uuid: Uuid) -> Self {
        KvMsg::kvset(key, Vec::new(), uuid)
    }

    /// A HUGZ heartbeat carrying the server's current sequence.
    pub fn hugz(sequence: i64) -> Self {
        KvMsg {
            key: HUGZ.to_vec(),
            sequence,
            ..KvMsg::default()
        }
    }

    /// A HUGZ marked with the server's Binary Star state: a client following a server
    /// that is not active knows to look elsewhere, and one looking for the active
    /// server knows where to go. (The references' HUGZ carry no mark.)
    pub fn hugz_from(state: BstarState, sequence: i64) -> Self {
        let mut hugz = KvMsg::hugz(sequence);
        hugz.set_state_text(state);
        hugz
    }

    /// The server state a HUGZ is marked with, if any (see [`STATE`]). Unknown text reads
    /// as no mark: only a server that says it is not active is taken at its word.
    pub fn hugz_state(&self) -> Option<BstarState> {
        state_mark(self.properties.get(STATE)?)
    }

    /// This HUGZ, also saying how many keys the server's map holds.
    pub fn with_keys(mut self, keys: usize) -> Self {
        // Decimal digits are a valid property value.
        if self
            .properties
            .set(KEYS, keys.to_string().as_bytes())
            .is_err()
        {
            debug_assert!(false, "keys property rejected");
        }
        self
    }

    /// The number of keys a HUGZ says its server holds, if it says.
    pub fn hugz_keys(&self) -> Option<u64> {
        std::str::from_utf8(self.properties.get(KEYS)?)
            .ok()?
            .parse()
            .ok()
    }

    fn set_state_text(&mut self, state: BstarState) {
        // A state name is a valid property value.
        if self
            .properties
            .set(STATE, state.to_string().as_bytes())
            .is_err()
        {
            debug_assert!(false, "state property rejected");
        }
    }

    /// The KTHXBAI that ends a snapshot of `subtree` taken at `sequence`.
    pub fn kthxbai(sequence: i64, subtree: Vec<u8>) -> Self {
        KvMsg {
            key: KTHXBAI.to_vec(),
            sequence,
            uuid: None,
            properties: Properties::new(),
            body: subtree,
        }
    }

    /// This KTHXBAI, naming the history of the map it ends (see [`HISTORY`]).
    pub fn with_history(mut self, history: &[u8]) -> Self {
        if self.properties.set(HISTORY, history).is_err() {
            debug_assert!(false, "history property rejected");
        }
        self
    }

    /// This KTHXBAI, marked as the end of a resume reply whose changes follow `after`
    /// (see [`RESUMED`]).
    pub fn with_resumed(mut self, after: i64) -> Self {
        if self
            .properties
            .set(RESUMED, after.to_string().as_bytes())
            .is_err()
        {
            debug_assert!(false, "resumed property rejected");
        }
        self
    }

    /// The same message with another sequence (KVSET → KVPUB, stored entry → KVSYNC).
    pub fn with_sequence(mut self, sequence: i64) -> Self {
        self.sequence = sequence;
        self
    }

    /// The same message with a ttl property, in the client form (decimal seconds).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.set_ttl_relative(ttl);
        self
    }

    /// True for a HUGZ heartbeat.
    pub fn is_hugz(&self) -> bool {
        self.as_msg_ref().is_hugz()
    }

    /// True for the KTHXBAI that ends a snapshot.
    pub fn is_kthxbai(&self) -> bool {
        self.as_msg_ref().is_kthxbai()
    }

    /// True when the key is one the protocol reserves (`HUGZ`, `KTHXBAI`): a client
    /// cannot set it.
    pub fn has_reserved_key(&self) -> bool {
        self.as_msg_ref().has_reserved_key()
    }

    /// True when this update deletes its key (empty body).
    pub fn is_delete(&self) -> bool {
        self.as_msg_ref().is_delete()
    }

    /// The five frames, in order.
    pub fn encode(&self) -> [Vec<u8>; FRAME_COUNT] {
        [
            self.key.clone(),
            self.sequence.to_be_bytes().to_vec(),
            self.uuid
                .map(|uuid| uuid.as_bytes().to_vec())
                .unwrap_or_default(),
            self.properties.as_frame().to_vec(),
            self.body.clone(),
        ]
    }

    /// Parses five frames. Sizes are checked against `limits` before anything is copied.
    pub fn decode<F: AsRef<[u8]>>(frames: &[F], limits: &Limits) -> Result<Self, DecodeError> {
        KvMsgRef::decode(frames, limits).map(|message| message.to_kvmsg())
    }

    /// This message, borrowed.
    pub fn as_msg_ref(&self) -> KvMsgRef<'_> {
        KvMsgRef {
            key: &self.key,
            sequence: self.sequence,
            uuid: self.uuid,
            properties: self.properties.as_frame(),
            body: &self.body,
        }
    }

    /// The `ttl` property as a client sent it (§5): decimal seconds, `0` or absent means
    /// persistent (`Ok(None)`); anything else is an error and the message is rejected.
    pub fn client_ttl(&self) -> Result<Option<Duration>, TtlError> {
        self.as_msg_ref().client_ttl()
    }

    /// The `ttl` property as read from a peer server (§5): a value ≥ 10^11 is epoch
    /// milliseconds; a value with a `.` and ≥ 10^9 is epoch seconds (the Python
    /// reference); otherwise relative seconds. `0` or absent means persistent.
    pub fn peer_ttl(&self) -> Result<Option<Ttl>, TtlError> {
        self.as_msg_ref().peer_ttl()
    }

    /// Sets the ttl in the client form: decimal seconds. A zero ttl removes the property
    /// (persistent).
    pub fn set_ttl_relative(&mut self, ttl: Duration) {
        if ttl.is_zero() {
            self.properties.remove(TTL);
        } else {
            self.set_ttl_text(&format_ttl_seconds(ttl));
        }
    }

    /// Sets the ttl in the stored form: absolute Unix epoch milliseconds, as the
    /// reference writes it into KVSYNC entries.
    pub fn set_ttl_expires_at(&mut self, expires_at: EpochMillis) {
        self.properties.set_ttl_expires_at(expires_at);
    }

    fn set_ttl_text(&mut self, text: &str) {
        // Our own ttl text is digits and at most one '.', always a valid value.
        if self.properties.set(TTL, text.as_bytes()).is_err() {
            debug_assert!(false, "ttl text {text:?} rejected");
        }
    }
}

/// A five-frame message decoded in place: validated exactly as [`KvMsg::decode`] does,
/// its key, properties and body borrowed from the received frames. A server reads every
/// update this way and copies only what it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvMsgRef<'a> {
    /// Frame 0: the key (or `HUGZ` / `KTHXBAI`).
    pub key: &'a [u8],
    /// Frame 1: the sequence number (0 in a KVSET).
    pub sequence: i64,
    /// Frame 2: the update's uuid, if any.
    pub uuid: Option<Uuid>,
    /// Frame 3: the properties frame as received (valid; its last record may lack the
    /// `\n` that [`KvMsgRef::normalized_properties`] adds).
    pub properties: &'a [u8],
    /// Frame 4: the value; empty means delete.
    pub body: &'a [u8],
}

impl<'a> KvMsgRef<'a> {
    /// Parses five frames without copying. Sizes are checked against `limits`.
    pub fn decode<F: AsRef<[u8]>>(frames: &'a [F], limits: &Limits) -> Result<Self, DecodeError> {
        let [key, sequence, uuid, properties, body] = frames else {
            return Err(DecodeError::FrameCount {
                expected: FRAME_COUNT,
                actual: frames.len(),
            });
        };
        let (key, sequence, uuid, properties, body) = (
            key.as_ref(),
            sequence.as_ref(),
            uuid.as_ref(),
            properties.as_ref(),
            body.as_ref(),
        );
        if key.is_empty() {
            return Err(DecodeError::EmptyKey);
        }
        if key.len() > limits.max_key_len {
            return Err(DecodeError::KeyTooLong {
                len: key.len(),
                max: limits.max_key_len,
            });
        }
        let sequence: [u8; 8] = sequence
            .try_into()
            .map_err(|_| DecodeError::SequenceLength {
                len: sequence.len(),
            })?;
        let uuid = match uuid.len() {
            0 => None,
            _ => Some(Uuid(
                uuid.try_into()
                    .map_err(|_| DecodeError::UuidLength { len: uuid.len() })?,
            )),
        };
        if properties.len() > limits.max_properties_len {
            return Err(DecodeError::PropertiesTooLarge {
                len: properties.len(),
                max: limits.max_properties_len,
            });
        }
        if body.len() > limits.max_body_len {
            return Err(DecodeError::BodyTooLarge {
                len: body.len(),
                max: limits.max_body_len,
            });
        }
        validate_properties(properties)?;
        Ok(KvMsgRef {
            key,
            sequence: i64::from_be_bytes(sequence),
            uuid,
            properties,
            body,
        })
    }

    /// The server state a HUGZ is marked with, if any, as [`KvMsg::hugz_state`] reads it.
    pub fn hugz_state(&self) -> Option<BstarState> {
        state_mark(property(self.properties, STATE)?)
    }

    /// The history a KTHXBAI names, if any (see [`HISTORY`]).
    pub fn history(&self) -> Option<&'a [u8]> {
        property(self.properties, HISTORY)
    }

    /// What a KTHXBAI's `resumed` mark says (see [`RESUMED`]): `None` when unmarked,
    /// `Some(None)` when the mark is not a sequence.
    pub fn resumed(&self) -> Option<Option<i64>> {
        let text = property(self.properties, RESUMED)?;
        Some(
            std::str::from_utf8(text)
                .ok()
                .and_then(|text| text.parse().ok()),
        )
    }

    /// An owned copy.
    pub fn to_kvmsg(&self) -> KvMsg {
        KvMsg {
            key: self.key.to_vec(),
            sequence: self.sequence,
            uuid: self.uuid,
            properties: Properties::from_valid_frame(self.properties),
            body: self.body.to_vec(),
        }
    }

    /// The properties frame as [`KvMsg`] holds and sends it: ending in `\n` unless
    /// empty. Borrowed unless the last record lacked its `\n`.
    pub fn normalized_properties(&self) -> std::borrow::Cow<'a, [u8]> {
        if self.properties.is_empty() || self.properties.ends_with(b"\n") {
            std::borrow::Cow::Borrowed(self.properties)
        } else {
            std::borrow::Cow::Owned(Properties::from_valid_frame(self.properties).encoded)
        }
    }

    /// True for a HUGZ heartbeat.
    pub fn is_hugz(&self) -> bool {
        self.key == HUGZ
    }

    /// True for the KTHXBAI that ends a snapshot.
    pub fn is_kthxbai(&self) -> bool {
        self.key == KTHXBAI
    }

    /// True when the key is one the protocol reserves (`HUGZ`, `KTHXBAI`).
    pub fn has_reserved_key(&self) -> bool {
        self.is_hugz() || self.is_kthxbai()
    }

    /// True when this update deletes its key (empty body).
    pub fn is_delete(&self) -> bool {
        self.body.is_empty()
    }

    /// See [`KvMsg::client_ttl`].
    pub fn client_ttl(&self) -> Result<Option<Duration>, TtlError> {
        let Some(text) = property(self.properties, TTL) else {
            return Ok(None);
        };
        let decimal = parse_decimal(text)?;
        Ok((!decimal.is_zero()).then(|| decimal.as_duration()))
    }

    /// See [`KvMsg::peer_ttl`].
    pub fn peer_ttl(&self) -> Result<Option<Ttl>, TtlError> {
        let Some(text) = property(self.properties, TTL) else {
            return Ok(None);
        };
        let decimal = parse_decimal(text)?;
        if decimal.is_zero() {
            return Ok(None);
        }
        let ttl = if decimal.whole >= EPOCH_MILLIS_THRESHOLD {
            Ttl::ExpiresAt(EpochMillis(decimal.whole))
        } else if decimal.has_point && decimal.whole >= EPOCH_SECONDS_THRESHOLD {
            let millis = decimal
                .whole
                .checked_mul(1000)
                .and_then(|millis| millis.checked_add(decimal.fraction_millis))
                .ok_or(TtlError::Overflow)?;
            Ttl::ExpiresAt(EpochMillis(millis))
        } else {
            Ttl::Relative(decimal.as_duration())
        };
        Ok(Some(ttl))
    }
}

/// ICANHAZ?: a client's request for a snapshot of a subtree (two frames).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SnapshotRequest {
    /// Key prefix of the snapshot; empty for the whole map.
    pub subtree: Vec<u8>,
    /// A clonekv server asking its peer for only the changes after its own position
    /// (PROTOCOL.md §13). Sent only to a peer whose KTHXBAI named its history, so a
    /// reference server never sees the third frame.
    pub resume: Option<ResumePosition>,
}

/// Where a restarted or re-syncing server's map stands: the reign that numbered its
/// last change and the sequence of that change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResumePosition {
    /// The reign (history id) of the map's last change.
    pub reign: u64,
    /// The map's sequence.
    pub sequence: i64,
}

/// Length of the resume frame: the reign id and the sequence, big-endian.
const RESUME_FRAME_LEN: usize = 16;

impl SnapshotRequest {
    /// A request for `subtree`.
    pub fn new(subtree: Vec<u8>) -> Self {
        SnapshotRequest {
            subtree,
            resume: None,
        }
    }

    /// A request for the whole map, or for the changes after `position` when the
    /// peer can serve them from its history.
    pub fn resume(position: ResumePosition) -> Self {
        SnapshotRequest {
            subtree: Vec::new(),
            resume: Some(position),
        }
    }

    /// The frames: `ICANHAZ?` and the subtree, then the resume position if any.
    pub fn encode(&self) -> Vec<Vec<u8>> {
        let mut frames = vec![ICANHAZ.to_vec(), self.subtree.clone()];
        if let Some(position) = self.resume {
            let mut frame = Vec::with_capacity(RESUME_FRAME_LEN);
            frame.extend_from_slice(&position.reign.to_be_bytes());
            frame.extend_from_slice(&position.sequence.to_be_bytes());
            frames.push(frame);
        }
        frames
    }

    /// Parses a request (without the identity frame a ROUTER prepends).
    pub fn decode<F: AsRef<[u8]>>(frames: &[F], limits: &Limits) -> Result<Self, DecodeError> {
        let (command, subtree, resume) = match frames {
            [command, subtree] => (command, subtree, None),
            [command, subtree, resume] => (command, subtree, Some(resume.as_ref())),
            _ => {
                return Err(DecodeError::FrameCount {
                    expected: 2,
                    actual: frames.len(),
                })
            }
        };
        if command.as_ref() != ICANHAZ {
            return Err(DecodeError::UnknownCommand);
        }
        let subtree = subtree.as_ref();
        if subtree.len() > limits.max_key_len {
            return Err(DecodeError::SubtreeTooLong {
                len: subtree.len(),
                max: limits.max_key_len,
            });
        }
        let resume = match resume {
            None => None,
            Some(frame) => {
                let (reign, sequence) = frame
                    .split_first_chunk::<8>()
                    .and_then(|(reign, rest)| Some((*reign, *rest.first_chunk::<8>()?)))
                    .filter(|_| frame.len() == RESUME_FRAME_LEN && subtree.is_empty())
                    .ok_or(DecodeError::BadResumeFrame)?;
                Some(ResumePosition {
                    reign: u64::from_be_bytes(reign),
                    sequence: i64::from_be_bytes(sequence),
                })
            }
        };
        Ok(SnapshotRequest {
            subtree: subtree.to_vec(),
            resume,
        })
    }
}

/// A server's Binary Star state, as exchanged between the pair every heartbeat: one
/// frame, ASCII decimal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BstarState {
    /// Started as primary, not yet decided (`1`).
    Primary,
    /// Started as backup, not yet decided (`2`).
    Backup,
    /// Serving clients (`3`).
    Active,
    /// Standing by, following the active (`4`).
    Passive,
}

impl BstarState {
    /// All states, in wire order.
    pub const ALL: [BstarState; 4] = [
        BstarState::Primary,
        BstarState::Backup,
        BstarState::Active,
        BstarState::Passive,
    ];

    /// The wire number.
    pub fn number(self) -> u8 {
        match self {
            BstarState::Primary => 1,
            BstarState::Backup => 2,
            BstarState::Active => 3,
            BstarState::Passive => 4,
        }
    }

    /// The one frame sent to the peer.
    pub fn encode(self) -> Vec<u8> {
        vec![b'0' + self.number()]
    }

    /// Parses the state message.
    pub fn decode<F: AsRef<[u8]>>(frames: &[F]) -> Result<Self, DecodeError> {
        let [frame] = frames else {
            return Err(DecodeError::FrameCount {
                expected: 1,
                actual: frames.len(),
            });
        };
        match frame.as_ref() {
            b"1" => Ok(BstarState::Primary),
            b"2" => Ok(BstarState::Backup),
            b"3" => Ok(BstarState::Active),
            b"4" => Ok(BstarState::Passive),
            _ => Err(DecodeError::InvalidState),
        }
    }
}

impl fmt::Display for BstarState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BstarState::Primary => "primary",
            BstarState::Backup => "backup",
            BstarState::Active => "active",
            BstarState::Passive => "passive",
        })
    }
}

#[cfg(test)]
mod tests;
