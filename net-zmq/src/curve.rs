//! CURVE security (libzmq's CurveZMQ): key pairs and their files, the socket options of a
//! CURVE server and client, and the ZAP policy that decides which clients a server
//! admits.
//!
//! Without keys nothing here is used and every socket speaks plain ZMTP, as the zguide
//! programs do. With keys, every socket of a server is CURVE: the sockets it binds are
//! CURVE servers with its own key pair, and a ZAP handler ([`ZapHandler`]) admits a
//! connection only if its client key is in the set the operator configured for that
//! socket's [`ZapDomain`]; the sockets it connects to its peer are CURVE clients that
//! accept only a server holding the peer's secret key. Docs: `docs/SECURITY.md`.
//!
//! Key files are small TOML files: a public key file holds `public-key = "<Z85>"`, a
//! key pair file (secret, mode 0600) holds `public-key` and `secret-key`. A list of
//! admitted keys is a directory of public key files (`*.pub`), or one file with a key
//! per line (bare Z85 or `public-key = "…"`; a line starting with `#` is a comment).

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::socket::ZmqSocket;

/// True when the linked libzmq can do CURVE (it was built with libsodium).
pub fn available() -> bool {
    zmq::has("curve") == Some(true)
}

/// Length of a CURVE key in bytes.
const KEY_LEN: usize = 32;
/// Length of a CURVE key in Z85 text.
const Z85_LEN: usize = 40;

/// Why a key or key file is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The text is not a 40-character Z85 key.
    #[error(
        "{what} is not a CURVE key: expected 40 characters of Z85 (as `clonekv keygen` writes)"
    )]
    NotAKey {
        /// Where the text came from.
        what: String,
    },
    /// A file could not be read or written.
    #[error("cannot {action} {}: {error}", path.display())]
    Io {
        /// read, write, list.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS's reason.
        error: std::io::Error,
    },
    /// A key file lacks a line it needs, or has one it cannot parse.
    #[error("key file {}: {problem}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A list of admitted keys holds none.
    #[error("{} holds no public key (a directory of *.pub files, or a file with one key per line)", path.display())]
    NoKeys {
        /// The file or directory.
        path: PathBuf,
    },
    /// The linked libzmq was built without CURVE.
    #[error("this build's libzmq has no CURVE support (built without libsodium); build clonekv from its repository, which links the system libzmq (see README.md)")]
    Unavailable,
    /// libzmq failed to make a key pair.
    #[error("cannot generate a CURVE key pair: {0}")]
    Generate(zmq::Error),
}

/// A CURVE public key. Displays as Z85.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// The key in `text` (40 characters of Z85, surrounding whitespace ignored).
    /// `what` names the text's origin in the error.
    pub fn from_z85(text: &str, what: &str) -> Result<PublicKey, KeyError> {
        decode_z85(text.trim())
            .map(PublicKey)
            .ok_or_else(|| KeyError::NotAKey {
                what: what.to_string(),
            })
    }

    /// The key from raw bytes (a ZAP request's credential); `None` unless 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<PublicKey> {
        <[u8; KEY_LEN]>::try_from(bytes).ok().map(PublicKey)
    }

    /// A key given on a command line or in a config file: the Z85 key itself, or the
    /// path of a public key file.
    pub fn from_key_or_file(argument: &str) -> Result<PublicKey, KeyError> {
        if let Some(key) = decode_z85(argument.trim()) {
            return Ok(PublicKey(key));
        }
        let path = Path::new(argument);
        let keys = read_key_lines(path)?;
        match keys.as_slice() {
            [key] => Ok(*key),
            [] => Err(KeyError::NoKeys {
                path: path.to_path_buf(),
            }),
            _ => Err(KeyError::File {
                path: path.to_path_buf(),
                problem: "holds more than one public key; give the one meant".to_string(),
            }),
        }
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The key as Z85 text.
    pub fn z85(&self) -> String {
        encode_z85(&self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.z85())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.z85())
    }
}

/// A CURVE key pair: who a server or client is. `Debug` never shows the secret key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    public: PublicKey,
    secret: [u8; KEY_LEN],
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .field("secret", &"<hidden>")
            .finish()
    }
}

impl KeyPair {
    /// A new random key pair (libzmq draws it from libsodium).
    pub fn generate() -> Result<KeyPair, KeyError> {
        if !available() {
            return Err(KeyError::Unavailable);
        }
        let pair = zmq::CurveKeyPair::new().map_err(KeyError::Generate)?;
        Ok(KeyPair {
            public: PublicKey(pair.public_key),
            secret: pair.secret_key,
        })
    }

    /// The pair from its two keys in Z85.
    pub fn from_z85(public: &str, secret: &str) -> Result<KeyPair, KeyError> {
        Ok(KeyPair {
            public: PublicKey::from_z85(public, "the public key")?,
            secret: decode_z85(secret.trim()).ok_or_else(|| KeyError::NotAKey {
                what: "the secret key".to_string(),
            })?,
        })
    }

    /// The public half, to give to the other side.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// Reads a key pair file (`public-key = "…"` and `secret-key = "…"`).
    pub fn read(path: &Path) -> Result<KeyPair, KeyError> {
        let text = read_text(path)?;
        let file_error = |problem: String| KeyError::File {
            path: path.to_path_buf(),
            problem,
        };
        let table: toml::Table = toml::from_str(&text).map_err(|error| {
            file_error(format!(
                "not a key pair file ({}); expected public-key = \"…\" and secret-key = \"…\"",
                error.message()
            ))
        })?;
        let field = |name: &str| {
            table
                .get(name)
                .and_then(toml::Value::as_str)
                .ok_or_else(|| file_error(format!("has no {name} = \"…\" line")))
        };
        let (public, secret) = (field("public-key")?, field("secret-key")?);
        KeyPair::from_z85(public, secret).map_err(|error| file_error(error.to_string()))
    }

    /// Writes the pair to `<base>.key` (mode 0600: it holds the secret) and the public
    /// key to `<base>.pub`; refuses to overwrite either unless `overwrite`. Returns the
    /// two paths.
    pub fn write(&self, base: &Path, overwrite: bool) -> Result<(PathBuf, PathBuf), KeyError> {
        let secret_path = with_suffix(base, ".key");
        let public_path = with_suffix(base, ".pub");
        let secret_text = format!(
            "# clonekv CURVE key pair: keep this file secret (mode 0600).\n\
             # Give the public key ({}) to the other side.\n\
             public-key = \"{}\"\nsecret-key = \"{}\"\n",
            public_path.display(),
            self.public.z85(),
            encode_z85(&self.secret)
        );
        let public_text = format!(
            "# clonekv CURVE public key (its secret is in {}).\npublic-key = \"{}\"\n",
            secret_path.display(),
            self.public.z85()
        );
        write_file(&secret_path, &secret_text, 0o600, overwrite)?;
        write_file(&public_path, &public_text, 0o644, overwrite)?;
        Ok((secret_path, public_path))
    }
}

fn with_suffix(base: &Path, suffix: &str) -> PathBuf {
    let mut name = base.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

fn write_file(path: &Path, text: &str, mode: u32, overwrite: bool) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |error| KeyError::Io {
        action: "write",
        path: path.to_path_buf(),
        error,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(mode);
    if overwrite {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(io)?;
    // An existing file kept its old mode: a secret must not stay readable by others.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)
}

fn read_text(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|error| KeyError::Io {
        action: "read",
        path: path.to_path_buf(),
        error,
    })
}

/// The public keys of a file: one per line, bare Z85 or `public-key = "…"`; blank lines,
/// lines starting with `#` (unless the whole line is a key: Z85 uses `#`) and other
/// `name = "value"` lines are skipped.
fn read_key_lines(path: &Path) -> Result<Vec<PublicKey>, KeyError> {
    let text = read_text(path)?;
    let mut keys = Vec::new();
    for (number, line) in text.lines().enumerate() {
        // Z85 uses `#`, `=` and `-`, but never `"` or a space: a line with a quote is a
        // `name = "value"` line, any other is a bare key.
        let line = line.trim();
        // A bare key may itself start with `#`: a line that is a whole key is one.
        if let Some(key) = decode_z85(line) {
            keys.push(PublicKey(key));
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let value = match line.split_once('=') {
            Some((name, value)) if line.contains('"') => match name.trim() {
                "public-key" => value.trim().trim_matches('"'),
                "secret-key" => {
                    return Err(KeyError::File {
                        path: path.to_path_buf(),
                        problem: format!(
                            "line {} holds a secret key: give the public key file (.pub), never the key pair",
                            number + 1
                        ),
                    })
                }
                _ => continue,
            },
            _ => line,
        };
        let key = PublicKey::from_z85(value, &format!("line {}", number + 1)).map_err(|error| {
            KeyError::File {
                path: path.to_path_buf(),
                problem: error.to_string(),
            }
        })?;
        keys.push(key);
    }
    Ok(keys)
}

/// The admitted public keys at `path`: every `*.pub` file of a directory (sorted by
/// name), or the keys of one file. At least one.
pub fn read_public_keys(path: &Path) -> Result<BTreeSet<PublicKey>, KeyError> {
    let mut keys = BTreeSet::new();
    if path.is_dir() {
        let list = |error| KeyError::Io {
            action: "list",
            path: path.to_path_buf(),
            error,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(list)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|file| file.extension().is_some_and(|ext| ext == "pub"))
            .collect();
        files.sort();
        for file in files {
            keys.extend(read_key_lines(&file)?);
        }
    } else {
        keys.extend(read_key_lines(path)?);
    }
    if keys.is_empty() {
        return Err(KeyError::NoKeys {
            path: path.to_path_buf(),
        });
    }
    Ok(keys)
}

fn decode_z85(text: &str) -> Option<[u8; KEY_LEN]> {
    if text.len() != Z85_LEN {
        return None;
    }
    let bytes = zmq::z85_decode(text).ok()?;
    <[u8; KEY_LEN]>::try_from(bytes.as_slice()).ok()
}

fn encode_z85(bytes: &[u8; KEY_LEN]) -> String {
    // 32 bytes is a multiple of 4: encoding cannot fail.
    zmq::z85_encode(bytes).unwrap_or_default()
}

/// The ZAP domain of a bound socket: which set of keys the handler admits on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZapDomain {
    /// The client-facing sockets (snapshot, publisher, collector): the admitted clients
    /// and the peer (a passive follows its active like a client).
    Clients,
    /// The Binary Star state publisher: the peer alone.
    Peer,
}

impl ZapDomain {
    /// The `ZMQ_ZAP_DOMAIN` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ZapDomain::Clients => "clonekv-clients",
            ZapDomain::Peer => "clonekv-peer",
        }
    }

    fn from_bytes(bytes: &[u8]) -> Option<ZapDomain> {
        [ZapDomain::Clients, ZapDomain::Peer]
            .into_iter()
            .find(|domain| domain.as_str().as_bytes() == bytes)
    }
}

/// The CURVE settings of one server of a pair.
#[derive(Clone, Debug)]
pub struct ServerCurve {
    /// This server's key pair.
    pub own: KeyPair,
    /// The peer server's public key.
    pub peer: PublicKey,
    /// The clients admitted on the client-facing sockets.
    pub clients: BTreeSet<PublicKey>,
}

/// A ZAP handler's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZapDecision {
    /// The key is admitted on this domain.
    Admit,
    /// Refused: the mechanism is not CURVE (a plain client reached a CURVE socket, which
    /// libzmq refuses before asking, so only a forged request gets here).
    NotCurve,
    /// Refused: the request names a domain this server never set.
    UnknownDomain,
    /// Refused: the key is not in the domain's set.
    NotAdmitted,
}

impl ServerCurve {
    /// Whether a connection that proved `client_key` with `mechanism` may use a socket
    /// of `domain`.
    pub fn decide(&self, domain: &[u8], mechanism: &[u8], client_key: &[u8]) -> ZapDecision {
        if mechanism != b"CURVE" {
            return ZapDecision::NotCurve;
        }
        let Some(domain) = ZapDomain::from_bytes(domain) else {
            return ZapDecision::UnknownDomain;
        };
        let Some(key) = PublicKey::from_bytes(client_key) else {
            return ZapDecision::NotAdmitted;
        };
        let admitted = match domain {
            ZapDomain::Peer => key == self.peer,
            // The server's own key: its HTTP gateway, a client in the same process.
            ZapDomain::Clients => {
                key == self.peer || key == self.own.public() || self.clients.contains(&key)
            }
        };
        if admitted {
            ZapDecision::Admit
        } else {
            ZapDecision::NotAdmitted
        }
    }
}

/// Makes `socket` a CURVE server with `own` keys whose connections ZAP checks in `domain`.
/// Before bind.
pub fn make_server(
    socket: &zmq::Socket,
    own: &KeyPair,
    domain: ZapDomain,
) -> Result<(), zmq::Error> {
    socket.set_zap_domain(domain.as_str())?;
    socket.set_curve_server(true)?;
    socket.set_curve_secretkey(&own.secret)
}

/// Makes `socket` a CURVE client with `own` keys that accepts only the server holding
/// the secret of `server`. Before connect.
pub fn make_client(
    socket: &zmq::Socket,
    own: &KeyPair,
    server: &PublicKey,
) -> Result<(), zmq::Error> {
    socket.set_curve_serverkey(server.as_bytes())?;
    socket.set_curve_publickey(own.public.as_bytes())?;
    socket.set_curve_secretkey(&own.secret)
}

/// libzmq's well-known ZAP endpoint: one handler per context binds it.
const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";

/// Frames of a ZAP request over a ROUTER: envelope, delimiter, and RFC 27's seven
/// (one credential for CURVE). More are read and let go.
const ZAP_REQUEST_FRAMES: usize = 9;

/// One ZAP request, as much of it as a decision and a log line need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZapRequest {
    /// The domain the socket set.
    pub domain: Vec<u8>,
    /// The peer's IP address, as libzmq gives it.
    pub address: String,
    /// `NULL`, `PLAIN` or `CURVE`.
    pub mechanism: Vec<u8>,
    /// The client's long-term public key (CURVE), else empty.
    pub client_key: Vec<u8>,
}

/// A ZAP request answered: what was asked and the decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZapAnswered {
    /// The request.
    pub request: ZapRequest,
    /// The answer given.
    pub decision: ZapDecision,
}

/// The ZAP handler of a server's context: a ROUTER on libzmq's ZAP endpoint, read by
/// the server's own loop (its fd registered with mio like any socket).
pub struct ZapHandler {
    socket: ZmqSocket,
}

impl ZapHandler {
    /// Binds the handler in `context`; before any CURVE socket of the context binds.
    pub fn bind(context: &zmq::Context) -> Result<ZapHandler, zmq::Error> {
        let socket = ZmqSocket::new(context, zmq::ROUTER, "zap")?;
        socket.inner().bind(ZAP_ENDPOINT)?;
        Ok(ZapHandler { socket })
    }

    /// The socket, to register with mio.
    pub fn socket(&self) -> &ZmqSocket {
        &self.socket
    }

    /// Answers every waiting request by `policy`; returns what was answered (so that
    /// the caller can log the refusals). A malformed request (which only libzmq sends
    /// here, so never) is answered with 500 when it has an id, else dropped.
    pub fn serve(&self, policy: &ServerCurve) -> Result<Vec<ZapAnswered>, zmq::Error> {
        let mut answered = Vec::new();
        while let Some(frames) = self.socket.try_recv_up_to(ZAP_REQUEST_FRAMES)? {
            // ROUTER envelope, empty delimiter, then RFC 27: version, request id,
            // domain, address, identity, mechanism, credentials.
            let [routing_id, _delimiter, _version, request_id, domain, address, _identity, mechanism, credentials @ ..] =
                frames.as_slice()
            else {
                continue;
            };
            let client_key = credentials.first().cloned().unwrap_or_default();
            let decision = policy.decide(domain, mechanism, &client_key);
            let (status, text): (&[u8], &[u8]) = match decision {
                ZapDecision::Admit => (b"200", b"OK"),
                ZapDecision::NotCurve => (b"400", b"CURVE required"),
                ZapDecision::UnknownDomain => (b"400", b"unknown domain"),
                ZapDecision::NotAdmitted => (b"400", b"key not admitted"),
            };
            let user_id: Vec<u8> = match PublicKey::from_bytes(&client_key) {
                Some(key) if decision == ZapDecision::Admit => key.z85().into_bytes(),
                _ => Vec::new(),
            };
            let reply: [&[u8]; 8] = [
                routing_id, b"", b"1.0", request_id, status, text, &user_id, b"",
            ];
            self.socket.send(&reply)?;
            answered.push(ZapAnswered {
                request: ZapRequest {
                    domain: domain.clone(),
                    address: String::from_utf8_lossy(address).into_owned(),
                    mechanism: mechanism.clone(),
                    client_key,
                },
                decision,
            });
        }
        Ok(answered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_linked_libzmq_has_curve() {
        // The vendored libzmq of zmq-sys has none; .cargo/config.toml links the
        // system's (docs/DECISIONS.md, "CURVE: the binaries link the system libzmq").
        assert_eq!(zmq::has("curve"), Some(true));
    }

    #[test]
    fn a_written_key_pair_reads_back_and_its_secret_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pair = KeyPair::generate().unwrap();
        let base = dir.path().join("server");
        let (secret, public) = pair.write(&base, false).unwrap();
        assert_eq!(KeyPair::read(&secret).unwrap(), pair);
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let key = PublicKey::from_key_or_file(public.to_str().unwrap()).unwrap();
        assert_eq!(key, pair.public());
        assert_eq!(
            PublicKey::from_key_or_file(&pair.public().z85()).unwrap(),
            key
        );
        // No overwrite unless asked.
        assert!(matches!(pair.write(&base, false), Err(KeyError::Io { .. })));
        pair.write(&base, true).unwrap();
        // A key pair file is never taken as a public key.
        let error = PublicKey::from_key_or_file(secret.to_str().unwrap()).unwrap_err();
        assert!(error.to_string().contains("secret key"), "{error}");
    }

    #[test]
    fn admitted_keys_come_from_a_directory_or_a_list() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        a.write(&dir.path().join("a"), false).unwrap();
        b.write(&dir.path().join("b"), false).unwrap();
        let keys = read_public_keys(dir.path()).unwrap();
        assert_eq!(keys, BTreeSet::from([a.public(), b.public()]));
        let list = dir.path().join("list.txt");
        std::fs::write(
            &list,
            format!(
                "# clients\n{}\n\npublic-key = \"{}\"\n",
                a.public(),
                b.public()
            ),
        )
        .unwrap();
        assert_eq!(read_public_keys(&list).unwrap(), keys);
        let hash = format!("#{}", "0".repeat(39));
        std::fs::write(&list, format!("# a comment\n{hash}\n")).unwrap();
        let expected = PublicKey::from_z85(&hash, "test").unwrap();
        assert_eq!(read_public_keys(&list).unwrap(), BTreeSet::from([expected]));
        std::fs::write(&list, "# none\n").unwrap();
        assert!(matches!(
            read_public_keys(&list),
            Err(KeyError::NoKeys { .. })
        ));
        std::fs::write(&list, "not-a-key\n").unwrap();
        let error = read_public_keys(&list).unwrap_err().to_string();
        assert!(error.contains("line 1") && error.contains("Z85"), "{error}");
    }

    #[test]
    fn zap_admits_clients_and_the_peer_but_only_the_peer_on_its_channel() {
        let peer = KeyPair::generate().unwrap().public();
        let client = KeyPair::generate().unwrap().public();
        let stranger = KeyPair::generate().unwrap().public();
        let policy = ServerCurve {
            own: KeyPair::generate().unwrap(),
            peer,
            clients: BTreeSet::from([client]),
        };
        let clients = ZapDomain::Clients.as_str().as_bytes();
        let peer_domain = ZapDomain::Peer.as_str().as_bytes();
        let decide = |domain, key: &PublicKey| policy.decide(domain, b"CURVE", key.as_bytes());
        assert_eq!(decide(clients, &client), ZapDecision::Admit);
        assert_eq!(decide(clients, &peer), ZapDecision::Admit);
        assert_eq!(decide(clients, &stranger), ZapDecision::NotAdmitted);
        assert_eq!(decide(peer_domain, &peer), ZapDecision::Admit);
        assert_eq!(decide(peer_domain, &client), ZapDecision::NotAdmitted);
        assert_eq!(decide(b"other", &peer), ZapDecision::UnknownDomain);
        assert_eq!(policy.decide(clients, b"NULL", b""), ZapDecision::NotCurve);
        assert_eq!(
            policy.decide(clients, b"CURVE", b"short"),
            ZapDecision::NotAdmitted
        );
    }

    #[test]
    fn a_curve_client_without_an_admitted_key_is_refused_by_the_handler() {
        let context = zmq::Context::new();
        let server_pair = KeyPair::generate().unwrap();
        let admitted = KeyPair::generate().unwrap();
        let stranger = KeyPair::generate().unwrap();
        let policy = ServerCurve {
            own: server_pair.clone(),
            peer: KeyPair::generate().unwrap().public(),
            clients: BTreeSet::from([admitted.public()]),
        };
        let zap = ZapHandler::bind(&context).unwrap();
        let pull = context.socket(zmq::PULL).unwrap();
        make_server(&pull, &server_pair, ZapDomain::Clients).unwrap();
        pull.set_rcvtimeo(100).unwrap();
        pull.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = pull.get_last_endpoint().unwrap().unwrap();
        let push = |pair: &KeyPair| {
            let socket = context.socket(zmq::PUSH).unwrap();
            make_client(&socket, pair, &server_pair.public()).unwrap();
            socket.set_linger(0).unwrap();
            socket.connect(&endpoint).unwrap();
            socket.send("hello", 0).unwrap();
            socket
        };
        let _stranger = push(&stranger);
        let _admitted = push(&admitted);
        let mut decisions = Vec::new();
        let mut received = Vec::new();
        for _ in 0..50 {
            decisions.extend(zap.serve(&policy).unwrap().into_iter().map(|a| a.decision));
            if let Ok(message) = pull.recv_bytes(0) {
                received.push(message);
            }
            if decisions.len() >= 2 && !received.is_empty() {
                break;
            }
        }
        assert!(decisions.contains(&ZapDecision::Admit), "{decisions:?}");
        assert!(
            decisions.contains(&ZapDecision::NotAdmitted),
            "{decisions:?}"
        );
        assert_eq!(received, vec![b"hello".to_vec()]);
    }
}
