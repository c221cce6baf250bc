//! Fleet templates are signed and versioned: a template learned on one station installs on
//! another only if it carries a valid ed25519 signature by the fleet's key and a version newer
//! than the one the receiving station holds for that name, so an old message cannot be replayed.
//! A station takes part only with `[fleet] enabled`, which requires the public key (the config
//! check refuses a fleet station without it); a station without it is local-only and ignores the
//! fleet topic.
//!
//! Payload (`TKS2`): the magic, the 64-byte signature of the body, then the body: the version
//! (u64 little-endian), the signer's station id (u16 little-endian length, then at most 64 bytes
//! of UTF-8) and the template file (the store's format). `TKS1` payloads (no version) are refused.
//!
//! What a station remembers per template name (approvals of its results, the highest version
//! held or published, and its signer) is kept in `fleet.json` in the store folder, so that
//! neither an approval nor a version is forgotten across a restart.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::atomic_write::{Durability, write_atomic};
use crate::config::Config;
pub use crate::config::{FleetConfig, MAX_SIGNER_LEN};
use crate::{Error, Result};

pub const MAGIC: &[u8; 4] = b"TKS2";
/// The unversioned format of earlier releases, refused: an old one could be replayed.
pub const MAGIC_V1: &[u8; 4] = b"TKS1";
const SIG_LEN: usize = 64;
/// Magic and signature, before the signed body.
const HEAD_LEN: usize = 4 + SIG_LEN;
/// The fleet state's file in the store folder (not a `.tkt`: the store's listing skips it).
pub const STATE_FILE: &str = "fleet.json";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FleetError {
    #[error("template is not signed (no TKS2 header)")]
    Unsigned,
    #[error(
        "TKS1 payload refused: it carries no version, so an old one could be replayed; \
         publish the template again from a station of this release (TKS2)"
    )]
    Unversioned,
    #[error("signed payload is malformed: {0}")]
    Malformed(&'static str),
    #[error("signature does not verify with the fleet key (forged or tampered)")]
    Forged,
    #[error("this station holds no fleet signing key ([fleet] signing_key_file)")]
    NoSigningKey,
    #[error("signer id must be 1 to {MAX_SIGNER_LEN} bytes of letters, digits, - or _")]
    BadSigner,
}

/// The signed body of a verified payload.
#[derive(Debug, PartialEq)]
pub struct Signed<'a> {
    pub version: u64,
    /// The station id of the station that published it.
    pub signer: &'a str,
    /// The template file.
    pub file: &'a [u8],
}

/// A signer is a station id (config.rs checks the same characters), so that it reads plainly
/// in events and cannot smuggle anything into them.
fn valid_signer(s: &str) -> bool {
    (1..=MAX_SIGNER_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The body a signature covers: version, signer, template file.
pub fn encode_body(version: u64, signer: &str, file: &[u8]) -> Result<Vec<u8>, FleetError> {
    if !valid_signer(signer) {
        return Err(FleetError::BadSigner);
    }
    let mut out = Vec::with_capacity(8 + 2 + signer.len() + file.len());
    out.extend_from_slice(&version.to_le_bytes());
    // at most 64 bytes, checked above: the length fits a u16
    out.extend_from_slice(&(signer.len() as u16).to_le_bytes());
    out.extend_from_slice(signer.as_bytes());
    out.extend_from_slice(file);
    Ok(out)
}

/// The parts of a body; any length is safe (a truncated body is an error, never a panic).
pub fn decode_body(body: &[u8]) -> Result<Signed<'_>, FleetError> {
    let (version, rest) = body
        .split_first_chunk::<8>()
        .ok_or(FleetError::Malformed("shorter than its version"))?;
    let (len, rest) = rest
        .split_first_chunk::<2>()
        .ok_or(FleetError::Malformed("shorter than its signer's length"))?;
    let len = usize::from(u16::from_le_bytes(*len));
    if len > MAX_SIGNER_LEN || rest.len() < len {
        return Err(FleetError::Malformed("signer length out of bounds"));
    }
    let (signer, file) = rest.split_at(len);
    let signer = std::str::from_utf8(signer)
        .ok()
        .filter(|s| valid_signer(s))
        .ok_or(FleetError::Malformed("signer is not a station id"))?;
    Ok(Signed {
        version: u64::from_le_bytes(*version),
        signer,
        file,
    })
}

/// The signature and the signed body of a payload, unchecked.
fn split(payload: &[u8]) -> Result<(Signature, &[u8]), FleetError> {
    match payload.get(..4) {
        Some(m) if m == MAGIC => {}
        Some(m) if m == MAGIC_V1 => return Err(FleetError::Unversioned),
        _ => return Err(FleetError::Unsigned),
    }
    let sig: &[u8; SIG_LEN] = payload
        .get(4..HEAD_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or(FleetError::Malformed("shorter than its signature"))?;
    Ok((Signature::from_bytes(sig), &payload[HEAD_LEN..]))
}

#[derive(Default)]
pub struct FleetKeys {
    verify: Option<VerifyingKey>,
    sign: Option<SigningKey>,
}

fn b64_32(what: &str, s: &str) -> Result<[u8; 32]> {
    let v = base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| Error::config(what, format!("not base64: {e}")))?;
    v.try_into()
        .map_err(|_| Error::config(what, "must be 32 bytes"))
}

impl FleetKeys {
    /// The keys of an enabled fleet; none when it is disabled (`cfg` is checked first, so keys
    /// on a disabled fleet are an error, not ignored).
    pub fn from_config(cfg: &FleetConfig) -> Result<Self> {
        if !cfg.enabled {
            return Ok(FleetKeys::default());
        }
        let verify = cfg
            .public_key
            .as_deref()
            .map(|k| {
                VerifyingKey::from_bytes(&b64_32("fleet.public_key", k)?)
                    .map_err(|e| Error::config("fleet.public_key", e.to_string()))
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
            return Err(Error::config(
                "fleet.signing_key_file",
                "the signing key does not belong to fleet.public_key",
            ));
        }
        Ok(FleetKeys { verify, sign })
    }

    pub fn local_only(&self) -> bool {
        self.verify.is_none()
    }

    pub fn can_sign(&self) -> bool {
        self.sign.is_some()
    }

    /// The signed fleet payload of a template file at `version`, naming `signer`.
    pub fn sign(&self, version: u64, signer: &str, file: &[u8]) -> Result<Vec<u8>, FleetError> {
        let key = self.sign.as_ref().ok_or(FleetError::NoSigningKey)?;
        let body = encode_body(version, signer, file)?;
        let sig = key.sign(&body);
        Ok([MAGIC.as_slice(), &sig.to_bytes(), &body].concat())
    }

    /// The signed body of a payload, if its signature verifies with the fleet key.
    pub fn verify<'a>(&self, payload: &'a [u8]) -> Result<Signed<'a>, FleetError> {
        let key = self.verify.as_ref().ok_or(FleetError::Forged)?;
        let (sig, body) = split(payload)?;
        // the signature first: nothing of an unverified body is read
        key.verify(body, &sig).map_err(|_| FleetError::Forged)?;
        decode_body(body)
    }
}

/// What this station knows of one template name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Held {
    /// Results an operator approved here, made with the template as it is stored now.
    pub approvals: u64,
    /// The highest fleet version installed or published here; 0: none.
    pub version: u64,
    /// The station that signed that version.
    pub signer: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FleetState {
    templates: BTreeMap<String, Held>,
}

/// A station's part in the fleet: its keys, its id (the signer of what it publishes) and what
/// it holds per template, kept on disk while the fleet is enabled.
pub struct Fleet {
    keys: FleetKeys,
    signer: String,
    admin_topic: String,
    state: FleetState,
    /// `fleet.json` in the store folder; none on a local-only station (it keeps nothing).
    path: Option<PathBuf>,
}

impl Fleet {
    /// The fleet of a station's config: checked (keys and `enabled` agree), keys read, and the
    /// state read back from the store folder.
    pub fn open(cfg: &Config) -> Result<Fleet> {
        cfg.fleet.validate(&cfg.station.id)?;
        let keys = FleetKeys::from_config(&cfg.fleet)?;
        let path = (!keys.local_only()).then(|| cfg.store.dir.join(STATE_FILE));
        let state = match &path {
            Some(p) => load_state(p)?,
            None => FleetState::default(),
        };
        Ok(Fleet {
            keys,
            signer: cfg.station.id.clone(),
            admin_topic: cfg.admin_topic(),
            state,
            path,
        })
    }

    /// A local-only fleet (no keys, nothing kept), for a station that does not take part.
    pub fn local_only(signer: &str, admin_topic: &str) -> Fleet {
        Fleet {
            keys: FleetKeys::default(),
            signer: signer.into(),
            admin_topic: admin_topic.into(),
            state: FleetState::default(),
            path: None,
        }
    }

    pub fn enabled(&self) -> bool {
        !self.keys.local_only()
    }

    pub fn can_sign(&self) -> bool {
        self.keys.can_sign()
    }

    pub fn signer(&self) -> &str {
        &self.signer
    }

    /// `<prefix>/<id>/admin`: the only topic `templates.publish` is taken on.
    pub fn admin_topic(&self) -> &str {
        &self.admin_topic
    }

    pub fn held(&self, name: &str) -> Held {
        self.state.templates.get(name).cloned().unwrap_or_default()
    }

    pub fn verify<'a>(&self, payload: &'a [u8]) -> Result<Signed<'a>, FleetError> {
        self.keys.verify(payload)
    }

    /// One more approved result of `name`.
    pub fn approved(&mut self, name: &str) -> Result<()> {
        self.update(name, |h| h.approvals += 1)
    }

    /// The template stored under `name` changed (learned, installed, deleted): approvals of
    /// the old one do not vouch for the new one. Versions stay: an old one is still refused.
    pub fn changed(&mut self, name: &str) -> Result<()> {
        if self.held(name).approvals == 0 {
            return Ok(()); // nothing to forget: no write
        }
        let stored = self.update(name, |h| h.approvals = 0);
        // forgotten here even when the disk keeps them: no publishing on the old approvals
        // while this process runs
        if let Some(h) = self.state.templates.get_mut(name) {
            h.approvals = 0;
        }
        stored
    }

    /// A fleet template installed: its version and signer are held from now on.
    pub fn installed(&mut self, name: &str, version: u64, signer: &str) -> Result<()> {
        self.update(name, |h| {
            *h = Held {
                approvals: 0,
                version,
                signer: Some(signer.into()),
            }
        })
    }

    /// Signs `file` as the next version of `name` (one above the highest held or published),
    /// which is recorded before it is returned: a version is never signed twice.
    pub fn sign_next(&mut self, name: &str, file: &[u8]) -> Result<(u64, Vec<u8>)> {
        let version = self.held(name).version.saturating_add(1);
        let payload = self
            .keys
            .sign(version, &self.signer, file)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let signer = self.signer.clone();
        self.update(name, |h| {
            h.version = version;
            h.signer = Some(signer);
        })?;
        Ok((version, payload))
    }

    /// Changes one entry and writes the state; on a failed write the change is undone, so
    /// memory never claims more than the disk holds. Nothing is kept while local-only.
    fn update(&mut self, name: &str, f: impl FnOnce(&mut Held)) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let before = self.state.clone();
        f(self.state.templates.entry(name.to_string()).or_default());
        if let Err(e) = save_state(path, &self.state) {
            self.state = before;
            return Err(e);
        }
        Ok(())
    }
}

fn load_state(path: &Path) -> Result<FleetState> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(FleetState::default()),
        Err(e) => return Err(Error::io(path, e)),
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        let why = format!(
            "not a fleet state file ({e}); it holds the fleet versions this station refuses to \
             go back below: restore it, or remove it to accept any version again"
        );
        Error::io(path, io::Error::new(io::ErrorKind::InvalidData, why))
    })
}

fn save_state(path: &Path, state: &FleetState) -> Result<()> {
    let json = serde_json::to_vec_pretty(state).map_err(|e| Error::Invalid(e.to_string()))?;
    let tmp = path.with_file_name(format!(".{STATE_FILE}.tmp"));
    // durable: a version forgotten after a power cut would let its old payload in again
    write_atomic(&tmp, path, &[&json], Durability::Full).map_err(|e| Error::io(e.path, e.cause))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(seed: u8, signing: bool) -> FleetKeys {
        let sk = SigningKey::from_bytes(&[seed; 32]);
        FleetKeys {
            verify: Some(sk.verifying_key()),
            sign: signing.then_some(sk),
        }
    }

    #[test]
    fn a_signed_payload_reads_back_with_its_version_and_signer() {
        let k = keys(7, true);
        let p = k.sign(3, "s-1", b"file bytes").unwrap();
        assert_eq!(&p[..4], MAGIC);
        let s = k.verify(&p).unwrap();
        assert_eq!(
            s,
            Signed {
                version: 3,
                signer: "s-1",
                file: b"file bytes"
            }
        );
        assert_eq!(k.sign(1, "", b"f"), Err(FleetError::BadSigner));
        assert_eq!(k.sign(1, &"a".repeat(65), b"f"), Err(FleetError::BadSigner));
        assert_eq!(
            keys(7, false).sign(1, "s", b"f"),
            Err(FleetError::NoSigningKey)
        );
    }

    #[test]
    fn forged_unversioned_and_foreign_payloads_are_refused() {
        let k = keys(7, true);
        let p = k.sign(1, "s1", b"template").unwrap();
        assert_eq!(keys(9, false).verify(&p), Err(FleetError::Forged));
        // a changed version, signer or file breaks the signature
        for at in [HEAD_LEN, HEAD_LEN + 8, HEAD_LEN + 10, p.len() - 1] {
            let mut bad = p.clone();
            bad[at] ^= 1;
            assert_eq!(k.verify(&bad), Err(FleetError::Forged), "byte {at}");
        }
        let mut v1 = p.clone();
        v1[..4].copy_from_slice(MAGIC_V1);
        assert_eq!(k.verify(&v1), Err(FleetError::Unversioned));
        assert_eq!(k.verify(b"template"), Err(FleetError::Unsigned));
        assert_eq!(FleetKeys::default().verify(&p), Err(FleetError::Forged));
    }

    #[test]
    fn truncated_and_garbage_payloads_are_errors_not_panics() {
        let k = keys(7, true);
        let p = k.sign(u64::MAX, "station", b"t").unwrap();
        for n in 0..p.len() {
            assert!(k.verify(&p[..n]).is_err(), "{n} bytes");
        }
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        for len in 0..300 {
            let garbage: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = k.verify(&garbage);
            let _ = decode_body(&garbage);
            let mut magic = MAGIC.to_vec();
            magic.extend_from_slice(&garbage);
            assert!(k.verify(&magic).is_err());
        }
    }

    #[test]
    fn bodies_with_bad_signers_are_malformed() {
        let body = |len: u16, signer: &[u8]| {
            [&5u64.to_le_bytes()[..], &len.to_le_bytes(), signer, b"file"].concat()
        };
        assert_eq!(decode_body(&body(2, b"s1")).unwrap().signer, "s1");
        for (len, signer) in [
            (0, &b""[..]),
            (65, &[b'a'; 65][..]),
            (2, b"s\n"),
            (2, &[0xff, 0xfe]),
            (u16::MAX, b"s1"),
        ] {
            assert!(
                matches!(
                    decode_body(&body(len, signer)),
                    Err(FleetError::Malformed(_))
                ),
                "{len} {signer:?}"
            );
        }
    }

    fn fleet_in(dir: &Path) -> Fleet {
        Fleet {
            keys: keys(7, true),
            signer: "s1".into(),
            admin_topic: "t/s1/admin".into(),
            state: load_state(&dir.join(STATE_FILE)).unwrap(),
            path: Some(dir.join(STATE_FILE)),
        }
    }

    #[test]
    fn approvals_and_versions_survive_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let mut f = fleet_in(d.path());
        assert_eq!(f.held("polish"), Held::default());
        f.approved("polish").unwrap();
        let (v, p) = f.sign_next("polish", b"file").unwrap();
        assert_eq!(v, 1);
        assert_eq!(f.verify(&p).unwrap().version, 1);
        f.installed("other", 7, "s2").unwrap();
        let f = fleet_in(d.path());
        let held = |approvals, version, signer: &str| Held {
            approvals,
            version,
            signer: Some(signer.into()),
        };
        assert_eq!(f.held("polish"), held(1, 1, "s1"));
        assert_eq!(f.held("other"), held(0, 7, "s2"));
        let mut f = f;
        assert_eq!(f.sign_next("other", b"x").unwrap().0, 8);
        f.changed("polish").unwrap();
        assert_eq!(fleet_in(d.path()).held("polish"), held(0, 1, "s1"));
    }

    #[test]
    fn an_unreadable_state_stops_the_start_and_a_failed_write_changes_nothing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(STATE_FILE), b"{not json").unwrap();
        let e = load_state(&d.path().join(STATE_FILE)).unwrap_err();
        assert!(e.to_string().contains("fleet.json"), "{e}");
        let mut f = fleet_in(&d.path().join("missing"));
        assert!(f.approved("polish").is_err());
        assert_eq!(f.held("polish"), Held::default());
    }
}
