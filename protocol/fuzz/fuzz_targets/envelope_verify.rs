//! Feeds arbitrary bytes to every decode-and-verify path a peer can reach: the raw envelope,
//! node HTTP requests, network answers, the WebSocket handshake and session frames, and signed
//! configs. Run: `cd protocol/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run envelope_verify`.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use resultity_protocol::config::{ConfigTrust, SignedConfig};
use resultity_protocol::messages::http::{self, DeregisterRequest, HeartbeatRequest, HeartbeatResponse, PingRequest, RegisterRequest};
use resultity_protocol::messages::ws::Hello;
use resultity_protocol::session::{self, NetworkKeys, NetworkSession, NodeSession};
use resultity_protocol::{NetworkId, NetworkKeypair, NodeKeypair, Purpose, RawEnvelope, limits};

struct Fixture {
    net: NetworkId,
    node: NodeKeypair,
    keys: NetworkKeys,
    trust: ConfigTrust,
}

static FX: LazyLock<Fixture> = LazyLock::new(|| {
    let network = NetworkKeypair::from_seed(&[0x22; 32]);
    let net = NetworkId::parse("resultity-testnet").unwrap_or_else(|_| unreachable!());
    Fixture {
        node: NodeKeypair::from_seed(&[0x11; 32]),
        keys: NetworkKeys::new(&[network.id().clone()]).unwrap_or_default(),
        trust: ConfigTrust::pinned(net.clone(), vec![network.id().clone()]),
        net,
    }
});

fuzz_target!(|data: &[u8]| {
    let f = &*FX;
    if let Ok(raw) = RawEnvelope::decode(data, limits::MAX_ENVELOPE_BYTES) {
        let _ = raw.open::<serde_json::Value>(raw.purpose(), &f.node.verifying_key());
    }
    let _ = http::open_node_request::<RegisterRequest>(data, &f.net);
    let _ = http::open_node_request::<PingRequest>(data, &f.net);
    let _ = http::open_node_request::<HeartbeatRequest>(data, &f.net);
    let _ = http::open_node_request::<DeregisterRequest>(data, &f.net);
    let _ = http::open_network_answer::<HeartbeatResponse>(data, &f.keys, &f.net, f.node.id());
    let _ = f.keys.open::<Hello>(data, Purpose::WsHello);
    let _ = session::open_auth(data, &f.net, "challenge");
    let mut nw = NetworkSession::new(f.net.clone(), f.node.id().clone(), f.node.verifying_key(), "s".into(), limits::MAX_FRAME_BYTES);
    let _ = nw.open(data);
    let mut ns = NodeSession::new(f.node.clone(), f.net.clone(), "s".into(), f.keys.clone());
    let _ = ns.open(data);
    if let Ok(c) = SignedConfig::decode(data) {
        let _ = f.trust.verify(&c, 1_767_225_600_001);
    }
});
