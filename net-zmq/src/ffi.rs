//! The one place this workspace calls libzmq without the `zmq` crate's safe wrapper.
//!
//! Sending a byte slice through the wrapper takes five calls into libzmq
//! (`zmq_msg_init_size`, `zmq_msg_data`, a copy, `zmq_msg_send`, and `zmq_msg_close`
//! when the emptied message drops); `zmq_send` does the same copy and send in one. On
//! the hot paths, where every short frame is copied this way, that is ~270 of the
//! main thread's ~9 150 instructions per update and ~470 of its ~4 450 per snapshot
//! entry (docs/PERFORMANCE.md, fourth round; DECISIONS.md, "One unsafe call").

use std::ffi::c_void;
use std::ptr::NonNull;

/// A `zmq::Socket` with its libzmq handle kept beside it, so that
/// [`HandledSocket::send_copy`] needs no `&mut`. The two are only ever built together
/// (the fields are private), so the handle is always this socket's, and it lives
/// exactly as long as the socket.
pub(crate) struct HandledSocket {
    socket: zmq::Socket,
    handle: NonNull<c_void>,
}

// SAFETY: the handle is only another name for `socket` and moves with it; `zmq::Socket`
// is `Send` (libzmq lets a socket move to another thread behind a full memory barrier,
// which moving a value to a thread provides), so the pair is too. It stays not `Sync`.
#[allow(unsafe_code)]
unsafe impl Send for HandledSocket {}

impl HandledSocket {
    /// Wraps `socket`; `None` if libzmq gave it no handle (never, for a created socket).
    pub(crate) fn new(mut socket: zmq::Socket) -> Option<HandledSocket> {
        let handle = NonNull::new(socket.as_mut_ptr())?;
        Some(HandledSocket { socket, handle })
    }

    /// The socket, for everything but [`HandledSocket::send_copy`].
    pub(crate) fn socket(&self) -> &zmq::Socket {
        &self.socket
    }

    /// Sends `bytes` as one frame of a message, copied into libzmq: what
    /// `self.socket().send(bytes, flags)` does, in one call instead of five.
    #[allow(unsafe_code)]
    pub(crate) fn send_copy(&self, bytes: &[u8], flags: i32) -> Result<(), zmq::Error> {
        // SAFETY: `handle` is the handle of `self.socket`, which is alive while `self`
        // is borrowed; `zmq::Socket` is not `Sync`, so no other thread is inside libzmq
        // with this socket meanwhile (the same guarantee the wrapper's own `send(&self)`
        // rests on). `bytes` is valid for reads of `bytes.len()` bytes for the whole
        // call, and `zmq_send` copies them before it returns (unlike `zmq_send_const`,
        // it keeps no pointer to the buffer).
        let sent = unsafe {
            zmq_sys::zmq_send(
                self.handle.as_ptr(),
                bytes.as_ptr().cast(),
                bytes.len(),
                flags,
            )
        };
        if sent == -1 {
            // SAFETY: reads this thread's errno, which the failed call just set.
            Err(zmq::Error::from_raw(unsafe { zmq_sys::zmq_errno() }))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_sent_by_copy_arrive_as_sent_and_errors_come_back_as_errno() {
        let context = zmq::Context::new();
        let receiver = context.socket(zmq::PAIR).unwrap();
        receiver.bind("inproc://send-copy").unwrap();
        let sender = HandledSocket::new(context.socket(zmq::PAIR).unwrap()).unwrap();
        sender.socket().connect("inproc://send-copy").unwrap();
        let mut buffer = vec![b'k'; 40];
        sender.send_copy(b"key", zmq::SNDMORE).unwrap();
        sender.send_copy(b"", zmq::SNDMORE).unwrap();
        sender.send_copy(&buffer, 0).unwrap();
        // The bytes were copied: changing the buffer now changes nothing sent.
        buffer.fill(b'x');
        let frames = receiver.recv_multipart(0).unwrap();
        assert_eq!(frames, vec![b"key".to_vec(), Vec::new(), vec![b'k'; 40]]);

        let router = context.socket(zmq::ROUTER).unwrap();
        router.set_router_mandatory(true).unwrap();
        let router = HandledSocket::new(router).unwrap();
        assert_eq!(
            router.send_copy(b"nobody", zmq::SNDMORE | zmq::DONTWAIT),
            Err(zmq::Error::EHOSTUNREACH)
        );
    }
}
