//! Properties: every message type round-trips through JSON and through a signed envelope, and no
//! decoder panics on arbitrary or mutated input.

use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{ConfigSnapshot, ConfigTrust, SignedConfig};
use crate::envelope::{self, RawEnvelope};
use crate::ids::{NetworkId, NodeId};
use crate::keys::{NetworkKeypair, NodeKeypair};
use crate::messages::http::*;
use crate::messages::ws::*;
use crate::purpose::Purpose;
use crate::session::{self, NetworkKeys, NetworkSession, NodeSession};
use crate::status::NodeStatus;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    v: &T,
) -> Result<(), TestCaseError> {
    let json = serde_json::to_string(v).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back: T = serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, v);
    // And through a signed envelope: sealed bytes open to the same value.
    let key = NodeKeypair::from_seed(&[42; 32]);
    let env = envelope::seal(&key, Purpose::HttpPing, v)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let raw = RawEnvelope::decode(env.as_bytes(), usize::MAX)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let opened: T = raw
        .open(Purpose::HttpPing, &key.verifying_key())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&opened, v);
    Ok(())
}

macro_rules! round_trip_tests {
    ($($name:ident: $t:ty;)*) => {
        proptest! {
            // Collection sizes come from PROPTEST_MAX_DEFAULT_SIZE_RANGE (.cargo/config.toml).
            #![proptest_config(ProptestConfig::with_cases(64))]
            $(
                #[test]
                fn $name(v in any::<$t>()) { round_trip(&v)?; }
            )*
        }
    };
}

round_trip_tests! {
    rt_challenge_request: ChallengeRequest;
    rt_challenge_response: ChallengeResponse;
    rt_register_request: RegisterRequest;
    rt_register_response: RegisterResponse;
    rt_ping_request: PingRequest;
    rt_ping_response: PingResponse;
    rt_heartbeat_request: HeartbeatRequest;
    rt_heartbeat_response: HeartbeatResponse;
    rt_deregister_request: DeregisterRequest;
    rt_deregister_response: DeregisterResponse;
    rt_config_digest_response: ConfigDigestResponse;
    rt_error_response: ErrorResponse;
    rt_hello: Hello;
    rt_auth: Auth;
    rt_welcome: Welcome;
    rt_node_message: Sequenced<NodeMessage>;
    rt_network_message: Sequenced<NetworkMessage>;
    rt_config_snapshot: ConfigSnapshot;
    rt_node_status: NodeStatus;
}

fn net() -> NetworkId {
    NetworkId::parse("testnet").unwrap()
}

struct Fixture {
    node: NodeKeypair,
    keys: NetworkKeys,
    trust: ConfigTrust,
}

/// Keys derived once: key derivation would otherwise dominate every case.
static FIXTURE: std::sync::LazyLock<Fixture> = std::sync::LazyLock::new(|| {
    let net_key = NetworkKeypair::from_seed(&[1; 32]);
    Fixture {
        node: NodeKeypair::from_seed(&[2; 32]),
        keys: NetworkKeys::new(&[net_key.id().clone()]).unwrap(),
        trust: ConfigTrust::pinned(net(), vec![net_key.id().clone()]),
    }
});

/// Runs every decoder of the crate over `bytes`; none may panic.
fn every_decoder(bytes: &[u8]) {
    let _ = RawEnvelope::decode(bytes, usize::MAX).map(|r| {
        let _ = r.parse_body::<serde_json::Value>();
    });
    let f = &*FIXTURE;
    let _ = SignedConfig::decode(bytes).map(|c| {
        let _ = f.trust.verify(&c, 0);
        let _ = c.parse_unverified();
    });
    let _ = open_node_request::<RegisterRequest>(bytes, &net());
    let _ = open_node_request::<PingRequest>(bytes, &net());
    let _ = open_node_request::<HeartbeatRequest>(bytes, &net());
    let _ = open_node_request::<DeregisterRequest>(bytes, &net());
    let keys = f.keys.clone();
    let node = &f.node;
    let _ = open_network_answer::<HeartbeatResponse>(bytes, &keys, &net(), node.id());
    let _ = keys.open::<Hello>(bytes, Purpose::WsHello);
    let _ = session::open_auth(bytes, &net(), "c");
    let mut ns = NodeSession::new(node.clone(), net(), "s".into(), keys);
    let _ = ns.open(bytes);
    let mut nw = NetworkSession::new(
        net(),
        node.id().clone(),
        node.verifying_key(),
        "s".into(),
        usize::MAX,
    );
    let _ = nw.open(bytes);
    if let Ok(s) = std::str::from_utf8(bytes) {
        let _ = NodeId::parse(s);
        let _ = crate::config::ConfigDigest::parse(s);
    }
    let _ = serde_json::from_slice::<NodeStatus>(bytes);
    let _ = serde_json::from_slice::<ConfigSnapshot>(bytes);
}

/// A valid node frame for mutation.
fn valid_frame() -> String {
    let f = &*FIXTURE;
    let mut s = NodeSession::new(f.node.clone(), net(), "s".into(), f.keys.clone());
    s.seal(NodeMessage::Credits {
        credits: 3,
        in_flight: 1,
    })
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        every_decoder(&bytes);
    }

    #[test]
    fn random_json_never_panics(v in crate::messages::arb::json_value()) {
        every_decoder(serde_json::to_string(&v).unwrap().as_bytes());
    }

    #[test]
    fn mutated_frames_never_panic_and_never_verify(pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let frame = valid_frame();
        let mut bytes = frame.clone().into_bytes();
        let i = pos.index(bytes.len());
        prop_assume!(bytes[i] != byte);
        bytes[i] = byte;
        every_decoder(&bytes);
        let node = &FIXTURE.node;
        let mut nw = NetworkSession::new(net(), node.id().clone(), node.verifying_key(), "s".into(), usize::MAX);
        // A changed byte either breaks the frame or is semantically invisible JSON whitespace
        // outside the signed body; it never yields a different accepted message.
        match nw.open(&bytes) {
            Err(_) => {}
            Ok(m) => {
                let mut clean = NetworkSession::new(net(), node.id().clone(), node.verifying_key(), "s".into(), usize::MAX);
                prop_assert_eq!(Some(m), clean.open(frame.as_bytes()).ok());
            }
        }
    }
}
