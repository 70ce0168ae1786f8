//! The frames of the messages a server sends: bytes that cost no allocation to make.
//!
//! Every KVPUB and every KVSYNC is five frames, and a server sends one per update and
//! one per stored key in each snapshot. Owned `Vec<u8>` frames cost four allocations
//! (and four frees) per message for bytes the server already holds. A [`Frame`] instead
//! keeps a short frame (key, sequence, uuid, a ttl property) inline and refers to a
//! stored entry for its body or properties: a reference-count increment, no copy. The
//! host reads every frame as `&[u8]` and hands it to its socket.

use super::store::Entry;
use std::fmt;
use std::hash::{Hash, Hasher};

/// Frames up to this long are kept inline: keys of the usual size, the sequence, the
/// uuid, a `ttl=…\n` property.
const INLINE: usize = 30;

/// One frame of an outgoing message. Reads as its bytes (`Deref<Target = [u8]>`,
/// `AsRef<[u8]>`); compares, orders and hashes exactly as those bytes do, so it can stand
/// wherever a `Vec<u8>` frame did (`to_vec` makes one).
#[derive(Clone)]
pub struct Frame(Repr);

#[derive(Clone)]
enum Repr {
    Inline {
        len: u8,
        bytes: [u8; INLINE],
    },
    Owned(Box<[u8]>),
    /// The body of a stored entry.
    Body(Entry),
    /// The (stored) properties frame of an entry.
    Properties(Entry),
}

impl Frame {
    /// An empty frame.
    pub const EMPTY: Frame = Frame(Repr::Inline {
        len: 0,
        bytes: [0; INLINE],
    });

    /// The body of `entry`, shared.
    pub(crate) fn body_of(entry: &Entry) -> Frame {
        if entry.body().is_empty() {
            return Frame::EMPTY;
        }
        Frame(Repr::Body(entry.clone()))
    }

    /// The stored properties frame of `entry`, shared.
    pub(crate) fn properties_of(entry: &Entry) -> Frame {
        if entry.properties_frame().is_empty() {
            return Frame::EMPTY;
        }
        Frame(Repr::Properties(entry.clone()))
    }

    /// A sequence frame: 8 bytes, big-endian.
    pub(crate) fn sequence(sequence: i64) -> Frame {
        Frame::from(sequence.to_be_bytes().as_slice())
    }

    /// The frame's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => bytes.get(..usize::from(*len)).unwrap_or_default(),
            Repr::Owned(bytes) => bytes,
            Repr::Body(entry) => entry.body(),
            Repr::Properties(entry) => entry.properties_frame(),
        }
    }
}

impl From<&[u8]> for Frame {
    /// Copies `bytes` (inline when short, in one allocation otherwise).
    fn from(bytes: &[u8]) -> Self {
        let mut inline = [0; INLINE];
        match (inline.get_mut(..bytes.len()), u8::try_from(bytes.len())) {
            (Some(prefix), Ok(len)) => {
                prefix.copy_from_slice(bytes);
                Frame(Repr::Inline { len, bytes: inline })
            }
            _ => Frame(Repr::Owned(Box::from(bytes))),
        }
    }
}

impl From<Vec<u8>> for Frame {
    /// Takes the vector's allocation, or keeps a short frame inline.
    fn from(bytes: Vec<u8>) -> Self {
        if bytes.len() <= INLINE {
            Frame::from(bytes.as_slice())
        } else {
            Frame(Repr::Owned(bytes.into_boxed_slice()))
        }
    }
}

impl AsRef<[u8]> for Frame {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

super::bytes_like!(Frame);

impl PartialEq<Vec<u8>> for Frame {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self.as_bytes() == other.as_slice()
    }
}

impl PartialEq<[u8]> for Frame {
    fn eq(&self, other: &[u8]) -> bool {
        self.as_bytes() == other
    }
}

impl Hash for Frame {
    /// Hashes exactly as the bytes (and so as a `Vec<u8>` of them) do.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_bytes(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvmsg::{KvMsg, Uuid};
    use crate::time::EpochMillis;
    use std::collections::hash_map::DefaultHasher;

    fn hash_of<T: Hash + ?Sized>(value: &T) -> u64 {
        let mut hasher = DefaultHasher::new();
        value.hash(&mut hasher);
        hasher.finish()
    }

    #[test]
    fn a_frame_is_its_bytes_whatever_holds_them() {
        let short = Frame::from(&b"/weather/london"[..]);
        let exact = Frame::from(vec![7u8; INLINE]);
        let long = Frame::from(vec![b'x'; INLINE + 1]);
        assert!(matches!(short.0, Repr::Inline { .. }));
        assert!(matches!(exact.0, Repr::Inline { .. }));
        assert!(matches!(long.0, Repr::Owned(_)));
        assert_eq!(short, b"/weather/london".to_vec());
        assert_eq!(long.to_vec(), vec![b'x'; INLINE + 1]);
        assert_eq!(Frame::EMPTY.as_bytes(), b"");
        assert_eq!(Frame::sequence(5).as_bytes(), &5i64.to_be_bytes());
        for frame in [&short, &exact, &long] {
            assert_eq!(hash_of(frame), hash_of(&frame.to_vec()));
        }
        assert_eq!(std::mem::size_of::<Frame>(), 32);
        assert_ne!(short, b"/weather/paris".to_vec());
        assert!(short == *b"/weather/london".as_slice());
        assert!(short != *b"/weather/paris".as_slice());
        assert_eq!(short.as_ref(), b"/weather/london");
        assert_eq!(format!("{short:?}"), format!("{:?}", b"/weather/london"));
    }

    #[test]
    fn shared_frames_read_the_stored_entry() {
        let update = KvMsg::kvset(b"/k".to_vec(), b"value".to_vec(), Uuid::from_bytes([1; 16]))
            .with_ttl(std::time::Duration::from_secs(5));
        let (_, entry) = Entry::from_update(
            &update.as_msg_ref(),
            Some(EpochMillis(1_700_000_005_000)),
            &mut Vec::new(),
        );
        assert_eq!(Frame::body_of(&entry), b"value".to_vec());
        assert_eq!(
            Frame::properties_of(&entry),
            b"ttl=1700000005000\n".to_vec()
        );
        let plain = KvMsg::kvset(b"/p".to_vec(), Vec::new(), Uuid::from_bytes([2; 16]));
        let (_, empty) = Entry::from_update(&plain.as_msg_ref(), None, &mut Vec::new());
        assert!(matches!(
            Frame::body_of(&empty).0,
            Repr::Inline { len: 0, .. }
        ));
        assert!(matches!(
            Frame::properties_of(&empty).0,
            Repr::Inline { len: 0, .. }
        ));
    }
}
