//! The decoder fuzz harness, shared by the `decode` fuzz target (`cargo fuzz`) and the
//! stable-Rust corpus replay test (`core/tests/fuzz_corpus.rs`), so both interpret a
//! corpus file the same way.

use arbitrary::{Arbitrary, Unstructured};

/// At most this many frames are built: every decoder rejects more than five.
const MAX_FRAMES: usize = 8;

/// Frames as the fuzzer's bytes spell them: for each frame a continuation byte (low bit
/// set = one more frame), a little-endian `u16` length, then that many bytes (fewer if
/// the input runs out). Explicit rather than `Vec<Vec<u8>>::arbitrary` so that seed
/// inputs can be written by hand (see `fuzz/README.md`).
fn frames_from(input: &mut Unstructured<'_>) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    while frames.len() < MAX_FRAMES && bool::arbitrary(input).unwrap_or(false) {
        let wanted = usize::from(u16::arbitrary(input).unwrap_or(0));
        let available = wanted.min(input.len());
        match input.bytes(available) {
            Ok(bytes) => frames.push(bytes.to_vec()),
            Err(_) => break,
        }
    }
    frames
}
use clonekv_core::kvmsg::{BstarState, KvMsg, Limits, Properties, SnapshotRequest};

/// Builds frames and limits from `data` and runs every decoder on them. Panics (the
/// fuzzer's signal) if a decoder panics or breaks the round-trip invariant. Returns
/// whether any decoder accepted the frames.
pub fn decode_everything(data: &[u8]) -> bool {
    let mut input = Unstructured::new(data);
    let tight_limits = bool::arbitrary(&mut input).unwrap_or(false);
    let limits = if tight_limits {
        Limits {
            max_key_len: 8,
            max_body_len: 16,
            max_properties_len: 24,
        }
    } else {
        Limits::default()
    };
    let frames = frames_from(&mut input);

    let mut accepted = false;
    if let Ok(message) = KvMsg::decode(&frames, &limits) {
        accepted = true;
        let encoded = message.encode();
        assert_eq!(encoded[0], frames[0], "key changed in a round trip");
        assert_eq!(encoded[1], frames[1], "sequence changed in a round trip");
        assert_eq!(encoded[2], frames[2], "uuid changed in a round trip");
        assert_eq!(encoded[4], frames[4], "body changed in a round trip");
        let again = KvMsg::decode(&encoded, &limits);
        assert_eq!(again.as_ref(), Ok(&message), "decode(encode(m)) != m");
        let _ = message.client_ttl();
        let _ = message.peer_ttl();
        for (name, value) in message.properties.iter() {
            assert!(!name.is_empty() && !name.contains(&b'=') && !name.contains(&b'\n'));
            assert!(!value.contains(&b'\n'));
        }
    }
    for frame in &frames {
        let _ = Properties::decode(frame);
    }
    if let Ok(request) = SnapshotRequest::decode(&frames, &limits) {
        accepted = true;
        assert_eq!(request.encode().to_vec(), frames, "ICANHAZ? round trip");
    }
    if let Ok(state) = BstarState::decode(&frames) {
        accepted = true;
        assert_eq!(vec![state.encode()], frames, "state round trip");
    }
    accepted
}
