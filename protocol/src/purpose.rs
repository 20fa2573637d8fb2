//! Purpose strings: which channel and message kind a signature is for (spec §4.2).
//!
//! A signature made for one purpose never verifies for another, so a heartbeat cannot be
//! replayed as a job result or a WebSocket message as an HTTP request.

use serde::{Deserialize, Serialize};

macro_rules! purposes {
    ($( $(#[$doc:meta])* $variant:ident = $text:literal, $dir:ident; )*) => {
        /// Every signed message kind, with its exact purpose string.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum Purpose {
            $( $(#[$doc])* #[serde(rename = $text)] $variant, )*
        }

        impl Purpose {
            /// All purposes, in spec order.
            pub const ALL: &'static [Purpose] = &[$(Purpose::$variant,)*];

            /// The exact string that enters the signature input.
            pub fn as_str(self) -> &'static str {
                match self { $(Purpose::$variant => $text,)* }
            }

            /// Parses a purpose string; `None` for anything the spec does not define.
            pub fn parse(s: &str) -> Option<Purpose> {
                match s { $($text => Some(Purpose::$variant),)* _ => None }
            }

            /// Who signs messages of this purpose.
            pub fn signed_by(self) -> SignedBy {
                match self { $(Purpose::$variant => SignedBy::$dir,)* }
            }
        }
    };
}

/// The party whose key signs a purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedBy {
    Node,
    Network,
}

purposes! {
    /// Node registration (HTTP).
    HttpRegister = "http/register", Node;
    HttpRegisterOk = "http/register.ok", Network;
    HttpPing = "http/ping", Node;
    HttpPingOk = "http/ping.ok", Network;
    HttpHeartbeat = "http/heartbeat", Node;
    HttpHeartbeatOk = "http/heartbeat.ok", Network;
    HttpDeregister = "http/deregister", Node;
    HttpDeregisterOk = "http/deregister.ok", Network;
    /// Network's first WebSocket message, carrying the session challenge.
    WsHello = "ws/hello", Network;
    /// Node's signed answer to the challenge; binds the session to the node key.
    WsAuth = "ws/auth", Node;
    WsWelcome = "ws/welcome", Network;
    WsJobAssign = "ws/job.assign", Network;
    WsJobCancel = "ws/job.cancel", Network;
    WsResultConfirm = "ws/result.confirm", Network;
    WsDrainAck = "ws/drain.ack", Network;
    WsConfigAvailable = "ws/config.available", Network;
    WsError = "ws/error", Network;
    WsJobAck = "ws/job.ack", Node;
    WsJobResult = "ws/job.result", Node;
    WsJobFail = "ws/job.fail", Node;
    /// One sequenced piece of a streamed job's output.
    WsJobChunk = "ws/job.chunk", Node;
    WsCredits = "ws/credits", Node;
    WsDraining = "ws/draining", Node;
    WsDrained = "ws/drained", Node;
    /// A signed configuration snapshot.
    NetConfig = "net/config", Network;
}

impl std::fmt::Display for Purpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_parse_back_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for p in Purpose::ALL {
            assert_eq!(Purpose::parse(p.as_str()), Some(*p));
            assert!(seen.insert(p.as_str()));
            let prefix_ok = ["http/", "ws/", "net/"]
                .iter()
                .any(|pre| p.as_str().starts_with(pre));
            assert!(prefix_ok, "{p}");
        }
        assert_eq!(Purpose::parse("ws/unknown"), None);
    }
}
