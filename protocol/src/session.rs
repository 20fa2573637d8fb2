//! Sealing and opening WebSocket messages (spec §7), and the network key set a node trusts.
//!
//! [`NodeSession`] and [`NetworkSession`] hold one side of an authenticated session: they stamp
//! outgoing messages with the session id and the next sequence number, and refuse incoming ones
//! that are unsigned, signed for another purpose or by another key, addressed elsewhere, from
//! another session, or replayed.

use ed25519_dalek::VerifyingKey;
use serde::de::DeserializeOwned;

use crate::envelope::{self, RawEnvelope};
use crate::error::{ProtocolError, Result};
use crate::ids::{NetworkId, NetworkKeyId, NodeId};
use crate::keys::{NetworkKeypair, NodeKeypair};
use crate::limits;
use crate::messages::ws::{Auth, NetworkMessage, NodeMessage, Sequenced};
use crate::purpose::{Purpose, SignedBy};
use crate::replay::{SeqCounter, SeqWindow};

/// Network keys a node trusts, parsed once (decompressing a point costs about a third of a
/// verification, so it is not repeated per message).
#[derive(Debug, Clone, Default)]
pub struct NetworkKeys {
    keys: Vec<(NetworkKeyId, VerifyingKey)>,
}

impl NetworkKeys {
    pub fn new(ids: &[NetworkKeyId]) -> Result<Self> {
        let keys = ids
            .iter()
            .map(|id| Ok((id.clone(), id.verifying_key()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { keys })
    }
    pub fn ids(&self) -> impl Iterator<Item = &NetworkKeyId> {
        self.keys.iter().map(|(id, _)| id)
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
    /// The key named by an envelope's signer field, if trusted.
    pub fn find(&self, signer: &str) -> Result<&VerifyingKey> {
        self.keys
            .iter()
            .find(|(id, _)| id.as_str() == signer)
            .map(|(_, k)| k)
            .ok_or_else(|| ProtocolError::UnknownSigner {
                signer: envelope::truncate(signer),
            })
    }
    /// Decodes, checks purpose, verifies with the trusted key the signer names, parses.
    pub fn open<T: DeserializeOwned>(&self, bytes: &[u8], purpose: Purpose) -> Result<T> {
        let raw = RawEnvelope::decode(bytes, limits::MAX_ENVELOPE_BYTES)?;
        raw.expect_purpose(purpose)?;
        raw.verify(self.find(raw.signer())?)?;
        raw.parse_body()
    }
}

/// Checks a body's network and node against what the channel says they must be.
pub fn check_addressing(
    found_network: &NetworkId,
    found_node: &NodeId,
    network: &NetworkId,
    node: &NodeId,
) -> Result<()> {
    if found_network != network {
        return Err(ProtocolError::WrongAudience {
            expected: network.to_string(),
            found: found_network.to_string(),
        });
    }
    if found_node != node {
        return Err(ProtocolError::WrongNode {
            expected: node.to_string(),
            found: found_node.to_string(),
        });
    }
    Ok(())
}

/// Network side of the handshake: opens a node's `auth` frame, checking signature, challenge,
/// network and protocol version. Returns the auth body and the node's verifying key.
pub fn open_auth(
    bytes: &[u8],
    network_id: &NetworkId,
    challenge: &str,
) -> Result<(Auth, VerifyingKey)> {
    let raw = RawEnvelope::decode(bytes, limits::MAX_ENVELOPE_BYTES)?;
    raw.expect_purpose(Purpose::WsAuth)?;
    let node_id = NodeId::parse(raw.signer())?;
    let key = node_id.verifying_key()?;
    raw.verify(&key)?;
    let auth: Auth = raw.parse_body()?;
    check_addressing(&auth.network_id, &auth.node_id, network_id, &node_id)?;
    if auth.challenge != challenge {
        return Err(ProtocolError::Replayed(
            "auth answers another connection's challenge".into(),
        ));
    }
    if !limits::PROTOCOL_VERSIONS.contains(&auth.protocol_version) {
        return Err(ProtocolError::NoCommonVersion {
            offered: vec![auth.protocol_version],
            supported: limits::PROTOCOL_VERSIONS.to_vec(),
        });
    }
    Ok((auth, key))
}

/// Fields both session sides share.
#[derive(Debug, Clone)]
struct SessionCore {
    network_id: NetworkId,
    node_id: NodeId,
    session_id: String,
    out: SeqCounter,
    inbound: SeqWindow,
}

impl SessionCore {
    fn wrap<M>(&mut self, msg: M) -> Sequenced<M> {
        Sequenced {
            network_id: self.network_id.clone(),
            node_id: self.node_id.clone(),
            session_id: self.session_id.clone(),
            seq: self.out.next_seq(),
            msg,
        }
    }

    /// Everything after the signature: addressing, session, purpose ↔ kind, sequence window.
    fn accept<M>(
        &mut self,
        raw: &RawEnvelope,
        kind_purpose: impl Fn(&M) -> Purpose,
    ) -> Result<Sequenced<M>>
    where
        Sequenced<M>: DeserializeOwned,
    {
        let body: Sequenced<M> = raw.parse_body()?;
        check_addressing(
            &body.network_id,
            &body.node_id,
            &self.network_id,
            &self.node_id,
        )?;
        if body.session_id != self.session_id {
            return Err(ProtocolError::Replayed(
                "message belongs to another session".into(),
            ));
        }
        let kind = kind_purpose(&body.msg);
        if kind != raw.purpose() {
            return Err(ProtocolError::WrongPurpose {
                expected: kind.as_str().into(),
                found: raw.purpose().as_str().into(),
            });
        }
        self.inbound.check(body.seq)?;
        Ok(body)
    }
}

fn decode_from(bytes: &[u8], max: usize, signed_by: SignedBy) -> Result<RawEnvelope> {
    let raw = RawEnvelope::decode(bytes, max)?;
    let p = raw.purpose();
    let handshake = matches!(p, Purpose::WsHello | Purpose::WsAuth | Purpose::WsWelcome);
    if p.signed_by() != signed_by || !p.as_str().starts_with("ws/") || handshake {
        return Err(ProtocolError::WrongPurpose {
            expected: "a post-handshake ws/ message of the peer".into(),
            found: p.as_str().into(),
        });
    }
    Ok(raw)
}

/// The node's side of an authenticated session.
#[derive(Debug, Clone)]
pub struct NodeSession {
    core: SessionCore,
    key: NodeKeypair,
    network_keys: NetworkKeys,
    max_frame: usize,
}

impl NodeSession {
    pub fn new(
        key: NodeKeypair,
        network_id: NetworkId,
        session_id: String,
        network_keys: NetworkKeys,
    ) -> Self {
        Self {
            core: SessionCore {
                network_id,
                node_id: key.id().clone(),
                session_id,
                out: SeqCounter::default(),
                inbound: SeqWindow::new(),
            },
            key,
            network_keys,
            max_frame: limits::MAX_FRAME_BYTES,
        }
    }
    pub fn session_id(&self) -> &str {
        &self.core.session_id
    }
    /// Signs `msg` under the next sequence number; returns the frame text.
    pub fn seal(&mut self, msg: NodeMessage) -> Result<String> {
        let purpose = msg.purpose();
        let body = self.core.wrap(msg);
        envelope::seal(&self.key, purpose, &body)
    }
    /// Trust another key set from now on (a config rotated the keys, or a retiring key's
    /// window ended) without breaking the session's sequence state.
    pub fn set_network_keys(&mut self, keys: NetworkKeys) {
        self.network_keys = keys;
    }
    /// Verifies and accepts one network frame.
    pub fn open(&mut self, frame: &[u8]) -> Result<Sequenced<NetworkMessage>> {
        let raw = decode_from(frame, self.max_frame, SignedBy::Network)?;
        raw.verify(self.network_keys.find(raw.signer())?)?;
        self.core.accept(&raw, NetworkMessage::purpose)
    }
}

/// The network's side of an authenticated session with one node.
#[derive(Debug, Clone)]
pub struct NetworkSession {
    core: SessionCore,
    node_key: VerifyingKey,
    max_frame: usize,
}

impl NetworkSession {
    /// `node_key` is the key `open_auth` returned for this node.
    pub fn new(
        network_id: NetworkId,
        node_id: NodeId,
        node_key: VerifyingKey,
        session_id: String,
        max_frame: usize,
    ) -> Self {
        Self {
            core: SessionCore {
                network_id,
                node_id,
                session_id,
                out: SeqCounter::default(),
                inbound: SeqWindow::new(),
            },
            node_key,
            max_frame,
        }
    }
    pub fn node_id(&self) -> &NodeId {
        &self.core.node_id
    }
    pub fn session_id(&self) -> &str {
        &self.core.session_id
    }
    /// Signs `msg` with the network key under the next sequence number.
    pub fn seal(&mut self, key: &NetworkKeypair, msg: NetworkMessage) -> Result<String> {
        let purpose = msg.purpose();
        let body = self.core.wrap(msg);
        envelope::seal(key, purpose, &body)
    }
    /// Verifies and accepts one node frame. The signer must be the session's node.
    pub fn open(&mut self, frame: &[u8]) -> Result<Sequenced<NodeMessage>> {
        let raw = decode_from(frame, self.max_frame, SignedBy::Node)?;
        if raw.signer() != self.core.node_id.as_str() {
            return Err(ProtocolError::WrongNode {
                expected: self.core.node_id.to_string(),
                found: envelope::truncate(raw.signer()),
            });
        }
        raw.verify(&self.node_key)?;
        self.core.accept(&raw, NodeMessage::purpose)
    }
}
