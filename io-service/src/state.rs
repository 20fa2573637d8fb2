//! The state every handler and task shares: settings, metrics, the core behind its lock, the
//! published snapshot and the kept rotations. Below the HTTP layers (node-facing, client-facing,
//! sessions), which all take it, and above the core and publishing, which it holds.

use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use axum::body::Body;
use resultity_protocol::config::NetworkConfig;
use resultity_protocol::messages::ConfigPointer;
use resultity_protocol::{ErrorCode, NetworkKeypair, ProtocolError};
use tokio::sync::{Semaphore, watch};

use crate::core::Core;
use crate::error::{ApiError, IoError};
use crate::metrics::{Channel, Metrics};
use crate::publish::{self, Published};
use crate::settings::Settings;

/// State shared by every handler and task.
#[derive(Debug)]
pub struct Shared {
    pub settings: Settings,
    pub metrics: Metrics,
    core: Mutex<Core>,
    published: RwLock<Arc<Published>>,
    /// Key-rotation snapshots kept for catch-up chains, oldest first, bounded.
    rotations: RwLock<Arc<Vec<Published>>>,
    /// Serializes publications so versions stay strictly increasing.
    publish_lock: Mutex<()>,
    pub sessions: Arc<Semaphore>,
    http_slots: Arc<Semaphore>,
    pub shutdown: watch::Receiver<bool>,
}

/// Cheap handle on [`Shared`], the axum state.
#[derive(Debug, Clone)]
pub struct AppState(pub Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// State around a core and the first published snapshot.
    pub(crate) fn new(
        settings: Settings,
        metrics: Metrics,
        core: Core,
        first: Published,
        rotations: Vec<Published>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        AppState(Arc::new(Shared {
            sessions: Arc::new(Semaphore::new(settings.limits.max_sessions)),
            http_slots: Arc::new(Semaphore::new(settings.limits.max_http_concurrency)),
            settings,
            metrics,
            core: Mutex::new(core),
            published: RwLock::new(Arc::new(first)),
            rotations: RwLock::new(Arc::new(rotations)),
            publish_lock: Mutex::new(()),
            shutdown,
        }))
    }

    /// A permit for one more node-facing HTTP request, if the bound allows it.
    pub(crate) fn try_http_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.http_slots.clone().try_acquire_owned().ok()
    }

    pub fn now(&self) -> u64 {
        self.settings.clock.now_ms()
    }

    /// The core, even if a panicking holder poisoned the lock (its state stays consistent
    /// per method, so serving on is better than failing every request).
    pub fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn published(&self) -> Arc<Published> {
        self.published
            .read()
            .map(|g| Arc::clone(&g))
            .unwrap_or_else(|p| Arc::clone(&p.into_inner()))
    }

    /// Counts a rejection and builds its answer.
    pub fn reject(
        &self,
        channel: Channel,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> ApiError {
        self.metrics.reject(channel, code);
        let err = ApiError::new(code, message, self.now());
        tracing::debug!(channel = channel.as_str(), code = %err.code, message = %err.message, "rejected");
        err
    }

    pub fn reject_protocol(&self, channel: Channel, err: &ProtocolError) -> ApiError {
        self.reject(channel, err.code(), err.to_string())
    }

    /// The key every network-signed message and snapshot is signed with now (see
    /// [`publish::signing_key`]); start checked that one of the held keys qualifies.
    pub fn signing_key(&self) -> &NetworkKeypair {
        let published = self.published();
        publish::signing_key(
            &self.settings.held_keys(),
            &published.snapshot.payload,
            self.now(),
        )
        .unwrap_or(&self.settings.network_key)
    }

    /// The kept key-rotation snapshots.
    pub fn rotations(&self) -> Arc<Vec<Published>> {
        self.rotations
            .read()
            .map(|g| Arc::clone(&g))
            .unwrap_or_else(|p| Arc::clone(&p.into_inner()))
    }

    /// Signs and publishes the next snapshot with `payload`; connected nodes are told.
    pub fn publish(&self, payload: NetworkConfig) -> Result<ConfigPointer, IoError> {
        self.publish_with(|prev| {
            publish::prepare_payload(
                payload,
                &self.settings.network_key,
                self.settings.next_network_key.as_ref(),
                Some(&prev.snapshot.payload),
            )
            .map(Some)
        })
        .and_then(|p| {
            p.ok_or_else(|| IoError::InvalidConfig {
                what: "publish".into(),
                reason: "nothing to publish".into(),
            })
        })
    }

    /// Starts the rotation to the configured next key, unless the published config already
    /// names it.
    pub fn rotate_keys(&self) -> Result<Option<ConfigPointer>, IoError> {
        let Some(next) = &self.settings.next_network_key else {
            return Ok(None);
        };
        if next.id() == self.settings.network_key.id() {
            return Err(IoError::InvalidConfig {
                what: "next network key".into(),
                reason: "is the current key; a rotation needs a new one".into(),
            });
        }
        let not_after = self.now().saturating_add(self.settings.key_overlap_ms);
        let pointer = self.publish_with(|prev| {
            if prev.snapshot.payload.network_keys.contains(next.id()) {
                return Ok(None);
            }
            Ok(Some(publish::rotation_payload(
                prev.snapshot.payload.clone(),
                &self.settings.network_key,
                next,
                not_after,
            )))
        })?;
        if let Some(p) = &pointer {
            tracing::info!(version = p.version, next_key = %next.id(), retiring_key = %self.settings.network_key.id(), not_after_ms = not_after, "network key rotation published");
        }
        Ok(pointer)
    }

    /// Publishes the confirmation of a rotation whose overlap window has ended.
    pub fn confirm_rotation(&self) -> Result<Option<ConfigPointer>, IoError> {
        let now = self.now();
        let pointer = self
            .publish_with(|prev| Ok(publish::confirmation_payload(&prev.snapshot.payload, now)))?;
        if let Some(p) = &pointer {
            tracing::info!(version = p.version, key = %self.signing_key().id(), "network key rotation confirmed");
        }
        Ok(pointer)
    }

    /// Signs and publishes the payload `make` derives from the snapshot in force (`None`:
    /// nothing to publish), under the publication lock so versions stay strictly increasing.
    fn publish_with(
        &self,
        make: impl FnOnce(&Published) -> Result<Option<NetworkConfig>, IoError>,
    ) -> Result<Option<ConfigPointer>, IoError> {
        let _serial = self.publish_lock.lock().unwrap_or_else(|p| p.into_inner());
        let prev = self.published();
        let Some(payload) = make(&prev)? else {
            return Ok(None);
        };
        let now = self.now();
        let key = publish::signing_key_for(
            &self.settings.held_keys(),
            &prev.snapshot.payload,
            &payload,
            now,
        )?;
        let next = publish::sign_next(
            key,
            &self.settings.network_id,
            Some(&prev),
            payload,
            now,
            self.settings.config_ttl_ms,
        )?;
        publish::check_next(&prev, &next, now)?;
        // Persist before serving: a restart must continue from this version, never below.
        if publish::is_rotation(&prev.snapshot.payload, &next.snapshot.payload) {
            let mut kept: Vec<Published> = self.rotations().as_ref().clone();
            kept.push(next.clone());
            let excess = kept.len().saturating_sub(publish::KEPT_ROTATIONS);
            kept.drain(..excess);
            if let Some(path) = &self.settings.config_state {
                publish::save_rotations(&publish::rotations_path(path), &kept)?;
            }
            *self.rotations.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(kept);
        }
        if let Some(path) = &self.settings.config_state {
            publish::save_state(path, &next)?;
        }
        let pointer = next.pointer();
        let config = Arc::new(next.snapshot.payload.clone());
        {
            let mut slot = self.published.write().unwrap_or_else(|p| p.into_inner());
            *slot = Arc::new(next);
        }
        self.core().set_config(config, &pointer, now);
        self.metrics.configs_published.inc();
        tracing::info!(version = pointer.version, digest = %pointer.digest, "config published");
        Ok(Some(pointer))
    }

    /// Re-reads the config source file and publishes it if the payload changed.
    pub fn reload(&self) -> Result<Option<ConfigPointer>, IoError> {
        let Some(path) = &self.settings.config_source else {
            return Err(IoError::InvalidConfig {
                what: "reload".into(),
                reason: "no config source file configured".into(),
            });
        };
        let loaded = publish::load_payload(path)?;
        self.publish_with(|prev| {
            let payload = publish::prepare_payload(
                loaded,
                &self.settings.network_key,
                self.settings.next_network_key.as_ref(),
                Some(&prev.snapshot.payload),
            )?;
            Ok((payload != prev.snapshot.payload).then_some(payload))
        })
    }
}

/// Reads a request body up to the configured limit.
pub async fn read_body(
    state: &AppState,
    body: Body,
    channel: Channel,
) -> Result<axum::body::Bytes, ApiError> {
    let max = state.settings.limits.max_body_bytes;
    let wait = std::time::Duration::from_millis(state.settings.limits.body_timeout_ms);
    let Ok(read) = tokio::time::timeout(wait, axum::body::to_bytes(body, max)).await else {
        return Err(state.reject(
            channel,
            ErrorCode::Timeout,
            format!("request body not received within {} ms", wait.as_millis()),
        ));
    };
    read.map_err(|e| {
        let text = e.to_string();
        if text.contains("length limit") {
            state.reject(
                channel,
                ErrorCode::TooLarge,
                format!("body exceeds {max} bytes"),
            )
        } else {
            state.reject(
                channel,
                ErrorCode::Malformed,
                format!("cannot read body: {text}"),
            )
        }
    })
}

/// Resolves once shutdown was requested (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
