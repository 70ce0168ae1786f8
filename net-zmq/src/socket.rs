//! A libzmq socket registered with mio, with the edge-triggered readiness rules built in.
//!
//! libzmq exposes one file descriptor per socket (`ZMQ_FD`) that signals *edges*: it
//! becomes readable when the socket's state may have changed, not while messages are
//! waiting. So after every wakeup, and after every send or receive on the socket, the
//! caller must ask `ZMQ_EVENTS` again and keep receiving until `POLLIN` is gone;
//! reading one message per wakeup hangs, and replying without re-checking loses wakeups.
//! [`ZmqSocket::try_recv`] is the only way to read, and it always asks `ZMQ_EVENTS`
//! first; the event loop calls it until it returns `None` for every socket.

use std::io;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

/// What happened to a non-blocking send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// The message is queued in libzmq.
    Sent,
    /// The peer's pipe is at its high-water mark (`EAGAIN`): try again later.
    WouldBlock,
    /// A ROUTER with `ZMQ_ROUTER_MANDATORY` has no peer with that routing id
    /// (`EHOSTUNREACH`): it disconnected.
    Unreachable,
}

/// One libzmq socket and its mio registration.
pub struct ZmqSocket {
    socket: zmq::Socket,
    name: &'static str,
}

impl ZmqSocket {
    /// A socket of `kind` in `context`; `name` appears in logs and errors.
    pub fn new(
        context: &zmq::Context,
        kind: zmq::SocketType,
        name: &'static str,
    ) -> Result<ZmqSocket, zmq::Error> {
        let socket = context.socket(kind)?;
        // Never block at shutdown on unsent messages.
        socket.set_linger(0)?;
        Ok(ZmqSocket { socket, name })
    }

    /// The libzmq socket, for options, bind and connect.
    pub fn inner(&self) -> &zmq::Socket {
        &self.socket
    }

    /// The name given at creation.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Registers the socket's `ZMQ_FD` with mio. It is only ever registered for
    /// READABLE: libzmq signals writability through the same fd and `ZMQ_EVENTS`.
    pub fn register(&self, registry: &Registry, token: Token) -> io::Result<()> {
        let fd = self.socket.get_fd().map_err(io::Error::other)?;
        registry.register(&mut SourceFd(&fd), token, Interest::READABLE)
    }

    /// Removes the mio registration.
    pub fn deregister(&self, registry: &Registry) -> io::Result<()> {
        let fd = self.socket.get_fd().map_err(io::Error::other)?;
        registry.deregister(&mut SourceFd(&fd))
    }

    /// The next whole message if one is waiting, without blocking.
    pub fn try_recv(&self) -> Result<Option<Vec<Vec<u8>>>, zmq::Error> {
        if !self.socket.get_events()?.contains(zmq::POLLIN) {
            return Ok(None);
        }
        match self.socket.recv_multipart(zmq::DONTWAIT) {
            Ok(frames) => Ok(Some(frames)),
            Err(zmq::Error::EAGAIN) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// True when a message could be sent now without blocking.
    pub fn is_writable(&self) -> Result<bool, zmq::Error> {
        Ok(self.socket.get_events()?.contains(zmq::POLLOUT))
    }

    /// Sends one multi-frame message without blocking. libzmq queues all parts of a
    /// message or none, and only the first part can hit the high-water mark.
    pub fn send<F: AsRef<[u8]>>(&self, frames: &[F]) -> Result<SendOutcome, zmq::Error> {
        let last = frames.len().saturating_sub(1);
        for (index, frame) in frames.iter().enumerate() {
            let flags = if index < last {
                zmq::DONTWAIT | zmq::SNDMORE
            } else {
                zmq::DONTWAIT
            };
            match self.socket.send(frame.as_ref(), flags) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) if index == 0 => return Ok(SendOutcome::WouldBlock),
                Err(zmq::Error::EHOSTUNREACH) if index == 0 => return Ok(SendOutcome::Unreachable),
                Err(error) => return Err(error),
            }
        }
        Ok(SendOutcome::Sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};
    use std::time::Duration;

    fn pair(context: &zmq::Context, endpoint: &str) -> (ZmqSocket, ZmqSocket) {
        let pull = ZmqSocket::new(context, zmq::PULL, "pull").unwrap();
        pull.inner().bind(endpoint).unwrap();
        let push = ZmqSocket::new(context, zmq::PUSH, "push").unwrap();
        push.inner().connect(endpoint).unwrap();
        (pull, push)
    }

    #[test]
    fn one_wakeup_drains_every_waiting_message() {
        let context = zmq::Context::new();
        let (pull, push) = pair(&context, "inproc://drain");
        let mut poll = Poll::new().unwrap();
        pull.register(poll.registry(), Token(0)).unwrap();
        for n in 0..5u8 {
            assert_eq!(push.send(&[[n], [n]]).unwrap(), SendOutcome::Sent);
        }
        let mut events = Events::with_capacity(4);
        let mut received = Vec::new();
        while received.len() < 5 {
            poll.poll(&mut events, Some(Duration::from_secs(5)))
                .unwrap();
            while let Some(frames) = pull.try_recv().unwrap() {
                received.push(frames);
            }
        }
        assert_eq!(received.len(), 5);
        assert_eq!(received[4], vec![vec![4], vec![4]]);
        assert_eq!(pull.try_recv().unwrap(), None);
    }

    #[test]
    fn a_full_pipe_reports_would_block_instead_of_blocking() {
        let context = zmq::Context::new();
        let pull = ZmqSocket::new(&context, zmq::PULL, "pull").unwrap();
        pull.inner().set_rcvhwm(1).unwrap();
        pull.inner().bind("inproc://full").unwrap();
        let push = ZmqSocket::new(&context, zmq::PUSH, "push").unwrap();
        push.inner().set_sndhwm(1).unwrap();
        push.inner().connect("inproc://full").unwrap();
        let outcomes: Vec<SendOutcome> = (0..10).map(|_| push.send(&[b"x"]).unwrap()).collect();
        assert!(outcomes.contains(&SendOutcome::WouldBlock));
    }

    #[test]
    fn a_mandatory_router_reports_an_unknown_peer() {
        let context = zmq::Context::new();
        let router = ZmqSocket::new(&context, zmq::ROUTER, "router").unwrap();
        router.inner().set_router_mandatory(true).unwrap();
        router.inner().bind("inproc://router").unwrap();
        let outcome = router.send(&[&b"nobody"[..], b"hello"]).unwrap();
        assert_eq!(outcome, SendOutcome::Unreachable);
    }
}
