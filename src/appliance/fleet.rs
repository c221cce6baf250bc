//! Fleet templates are signed: a template learned on one station installs on another only if it
//! carries a valid ed25519 signature by the fleet's key. A station without the fleet's public key
//! is local-only: it ignores the fleet topic. Payload: `TKS1`, the 64-byte signature of the
//! template file, then the template file (the store's format).

use std::path::Path;

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

pub use crate::config::FleetConfig;
use crate::{Error, Result};

pub const MAGIC: &[u8; 4] = b"TKS1";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FleetError {
    #[error("template is not signed")]
    Unsigned,
    #[error("signature does not verify with the fleet key (forged or tampered)")]
    Forged,
}

#[derive(Default)]
pub struct FleetKeys {
    verify: Option<VerifyingKey>,
    sign: Option<SigningKey>,
}

fn b64_32(what: &str, s: &str) -> Result<[u8; 32]> {
    let v = base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| Error::Config {
            key: what.into(),
            reason: format!("not base64: {e}"),
        })?;
    v.try_into().map_err(|_| Error::Config {
        key: what.into(),
        reason: "must be 32 bytes".into(),
    })
}

impl FleetKeys {
    pub fn from_config(cfg: &FleetConfig) -> Result<Self> {
        let verify = cfg
            .public_key
            .as_deref()
            .map(|k| {
                VerifyingKey::from_bytes(&b64_32("fleet.public_key", k)?).map_err(|e| {
                    Error::Config {
                        key: "fleet.public_key".into(),
                        reason: e.to_string(),
                    }
                })
            })
            .transpose()?;
        let sign = cfg
            .signing_key_file
            .as_deref()
            .map(|p: &Path| {
                let s = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
                Ok::<_, Error>(SigningKey::from_bytes(&b64_32(
                    "fleet.signing_key_file",
                    &s,
                )?))
            })
            .transpose()?;
        if let (Some(v), Some(s)) = (&verify, &sign)
            && s.verifying_key() != *v
        {
            return Err(Error::Config {
                key: "fleet.signing_key_file".into(),
                reason: "the signing key does not belong to fleet.public_key".into(),
            });
        }
        Ok(FleetKeys { verify, sign })
    }

    pub fn local_only(&self) -> bool {
        self.verify.is_none()
    }

    /// The signed fleet payload of a template file, when this station holds the signing key.
    pub fn sign(&self, file: &[u8]) -> Option<Vec<u8>> {
        let key = self.sign.as_ref()?;
        let sig = key.sign(file);
        let mut out = Vec::with_capacity(4 + 64 + file.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&sig.to_bytes());
        out.extend_from_slice(file);
        Some(out)
    }

    /// The template file inside a signed payload, if the signature verifies.
    pub fn verify<'a>(&self, payload: &'a [u8]) -> Result<&'a [u8], FleetError> {
        let key = self.verify.as_ref().ok_or(FleetError::Forged)?;
        if payload.len() < 68 || &payload[..4] != MAGIC {
            return Err(FleetError::Unsigned);
        }
        let sig: [u8; 64] = payload[4..68]
            .try_into()
            .map_err(|_| FleetError::Unsigned)?;
        let file = &payload[68..];
        key.verify(file, &Signature::from_bytes(&sig))
            .map_err(|_| FleetError::Forged)?;
        Ok(file)
    }
}
