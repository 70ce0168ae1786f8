//! The raw relay: a collector SUB bound on one endpoint, a PUB bound on another, and
//! libzmq's own proxy forwarding every frame between them without looking at it. Same
//! sockets and high-water marks as a CHP server's update path, none of its work: the
//! physical limit of a CHP server on this machine. Run as `clonekv bench-relay`, a
//! separate process like the server it stands for.

use super::BenchError;

/// Binds both sockets and forwards until the process is killed.
pub fn run(collector: &str, publisher: &str, hwm: i32) -> Result<(), BenchError> {
    let context = zmq::Context::new();
    let fail = |what: &str, endpoint: &str, error: zmq::Error| {
        BenchError::new(format!("relay: {what} {endpoint}: {error}"))
    };
    let frontend = context
        .socket(zmq::SUB)
        .map_err(|error| fail("cannot create the SUB for", collector, error))?;
    frontend
        .set_rcvhwm(hwm)
        .and_then(|()| frontend.set_subscribe(b""))
        .and_then(|()| frontend.bind(collector))
        .map_err(|error| fail("cannot bind", collector, error))?;
    let backend = context
        .socket(zmq::PUB)
        .map_err(|error| fail("cannot create the PUB for", publisher, error))?;
    backend
        .set_sndhwm(hwm)
        .and_then(|()| backend.bind(publisher))
        .map_err(|error| fail("cannot bind", publisher, error))?;
    zmq::proxy(&frontend, &backend).map_err(|error| fail("proxy failed on", collector, error))
}
