//! `resultity-protocol`: the wire contract shared by the Resultity network (IO service) and its
//! nodes (sidecar), and read by the operator.
//!
//! `docs/protocol.md` is the normative specification; this crate implements it:
//! * [`ids`] — node ids and network key ids (self-certifying public-key text), network and job ids;
//! * [`crypto`] and [`envelope`] — the exact signature input and the signed envelope, verified
//!   strictly before the body is parsed;
//! * [`purpose`] — the purpose strings that separate channels and message kinds;
//! * [`messages`] — every HTTP and WebSocket body;
//! * [`replay`] — bounded nonce store and sequence windows, driven by an injectable [`clock`];
//! * [`config`] — signed config snapshots, `config_digest`, version/expiry/rollback rules and
//!   key rotation;
//! * [`known_answer`] — the known-answer self-test a config may give a model;
//! * [`session`] — helpers that seal and open post-handshake WebSocket messages;
//! * [`status`] — the node's `/status` document shared with the operator;
//! * [`codes`] and [`limits`] — error codes, close codes and the numbers the spec fixes.

pub mod clock;
pub mod codes;
pub mod config;
pub mod crypto;
pub mod digest;
pub mod envelope;
pub mod error;
pub mod ids;
pub mod keys;
pub mod known_answer;
pub mod limits;
pub mod messages;
pub mod purpose;
pub mod replay;
pub mod session;
pub mod status;

#[cfg(test)]
mod proptests;

pub use codes::ErrorCode;
pub use config::{ConfigSnapshot, ConfigTrust, ConfigVerdict, SignedConfig};
pub use digest::ConfigDigest;
pub use envelope::RawEnvelope;
pub use error::{ProtocolError, RotationFault, error_chain, exit_code};
pub use ids::{JobId, NetworkId, NetworkKeyId, NodeId};
pub use keys::{NetworkKeypair, NodeKeypair};
pub use purpose::Purpose;
