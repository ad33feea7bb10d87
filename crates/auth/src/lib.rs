//! Sensorhub's keys and tokens.
//!
//! One Ed25519 key pair: the private half signs tokens and stays with the operator (`sensorctl`); the
//! services hold only the public half, so a compromised service cannot mint tokens. Tokens are JWTs
//! (EdDSA) whose `role` says what they allow: `device` (write as the device named in `sub`), `reader`
//! (read the API), `admin` (also manage devices). Every token has an id (`jti`) that is logged in its
//! place, and revocation works by id: the device registry (followed by ingest-http) and the app
//! tokens' list (followed by query-api), both in PostgreSQL.

mod app_tokens;
mod follow;
mod registry;

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

pub use app_tokens::{AppTokenChange, AppTokenRefusal, AppTokenRegistry};
pub use follow::{Followed, Follower, RefreshCause, keep_fresh};
pub use registry::{Access, CredentialChange, DeviceRegistry};

/// Every Sensorhub token says it was issued by Sensorhub.
pub const ISSUER: &str = "sensorhub";
pub const SIGNING_KEY_FILE: &str = "signing-key.pem";
pub const VERIFYING_KEY_FILE: &str = "verifying-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("key: {0}")]
    Key(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Writes readings as the device named in `sub`.
    Device,
    /// Reads the query API.
    Reader,
    /// Reads, and commands devices; manages nothing.
    Operator,
    /// Reads, commands devices, and manages devices and tokens.
    Admin,
}

impl Role {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "device" => Some(Self::Device),
            "reader" => Some(Self::Reader),
            "operator" => Some(Self::Operator),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Reader => "reader",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }

    pub fn can_read(self) -> bool {
        matches!(self, Self::Reader | Self::Operator | Self::Admin)
    }

    /// May send devices commands, and cancel them.
    pub fn can_command(self) -> bool {
        matches!(self, Self::Operator | Self::Admin)
    }
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The device id (role `device`) or the app's name.
    pub sub: String,
    pub role: Role,
    /// The token's id: logged instead of the token, and what revocation names.
    pub jti: String,
    pub iat: i64,
    /// Seconds since the epoch; device tokens have none (they are revoked, not expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
}

fn new_token_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl Claims {
    pub fn device(device_id: &str, now: i64) -> Self {
        Self {
            iss: ISSUER.into(),
            sub: device_id.into(),
            role: Role::Device,
            jti: new_token_id(),
            iat: now,
            exp: None,
        }
    }

    pub fn app(name: &str, role: Role, ttl_secs: u64, now: i64) -> Self {
        Self {
            iss: ISSUER.into(),
            sub: name.into(),
            role,
            jti: new_token_id(),
            iat: now,
            exp: Some(now.saturating_add(i64::try_from(ttl_secs).unwrap_or(i64::MAX))),
        }
    }
}

/// Creates a new key pair in `dir`: `signing-key.pem` (private, mode 0600) and `verifying-key.pem`.
/// Refuses to overwrite an existing key unless `overwrite`: a new key invalidates every token.
pub fn generate_key_pair(dir: &Path, overwrite: bool) -> Result<(PathBuf, PathBuf), AuthError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| AuthError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let signing_path = dir.join(SIGNING_KEY_FILE);
    let verifying_path = dir.join(VERIFYING_KEY_FILE);
    if !overwrite && signing_path.exists() {
        return Err(AuthError::Key(format!(
            "{} exists; a new key would invalidate every token issued with it (use --force)",
            signing_path.display()
        )));
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let private = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| AuthError::Key(e.to_string()))?;
    let public = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| AuthError::Key(e.to_string()))?;
    write_private(&signing_path, private.as_bytes()).map_err(io(&signing_path))?;
    std::fs::write(&verifying_path, public).map_err(io(&verifying_path))?;
    Ok((signing_path, verifying_path))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

fn read(path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|source| AuthError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Signs tokens; only `sensorctl` (and whoever the operator trusts with the private key) has one.
pub struct TokenSigner {
    key: EncodingKey,
}

impl TokenSigner {
    pub fn from_pem(pem: &[u8]) -> Result<Self, AuthError> {
        Ok(Self {
            key: EncodingKey::from_ed_pem(pem).map_err(|e| AuthError::Key(e.to_string()))?,
        })
    }

    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        Self::from_pem(&read(path)?)
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &self.key)
            .map_err(|e| AuthError::Key(e.to_string()))
    }
}

/// Checks tokens: EdDSA signatures by our key only (`alg: none` and every other algorithm are
/// refused), our issuer, and the expiry when there is one.
#[derive(Clone)]
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl TokenVerifier {
    pub fn from_pem(pem: &[u8]) -> Result<Self, AuthError> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["iss", "sub"]);
        validation.validate_exp = true;
        validation.leeway = 30;
        Ok(Self {
            key: DecodingKey::from_ed_pem(pem).map_err(|e| AuthError::Key(e.to_string()))?,
            validation,
        })
    }

    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        Self::from_pem(&read(path)?)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })
    }
}

/// A [`TokenVerifier`] that remembers the tokens it has verified: a device sends the same token with
/// every request, and checking an Ed25519 signature costs far more than the rest of an ingest
/// request. Only tokens that verified are kept (a changed token is another string, and is checked
/// in full); expiry is checked at every use; revocation is the device registry's business. Bounded:
/// when full, it starts afresh.
pub struct CachedVerifier {
    verifier: TokenVerifier,
    verified: std::sync::Mutex<std::collections::HashMap<String, Claims>>,
    capacity: usize,
}

impl CachedVerifier {
    pub fn new(verifier: TokenVerifier, capacity: usize) -> Self {
        Self {
            verifier,
            verified: Default::default(),
            capacity: capacity.max(1),
        }
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let cached = self
            .verified
            .lock()
            .ok()
            .and_then(|verified| verified.get(token).cloned());
        if let Some(claims) = cached {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            return match claims.exp {
                Some(exp) if now > exp.saturating_add(self.verifier.validation.leeway as i64) => {
                    Err(AuthError::Expired)
                }
                _ => Ok(claims),
            };
        }
        let claims = self.verifier.verify(token)?;
        if let Ok(mut verified) = self.verified.lock() {
            if verified.len() >= self.capacity {
                verified.clear();
            }
            verified.insert(token.to_owned(), claims.clone());
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (tempdir::Dir, TokenSigner, TokenVerifier) {
        let dir = tempdir::Dir::new();
        let (signing, verifying) = generate_key_pair(&dir.0, false).unwrap();
        (
            dir,
            TokenSigner::from_file(&signing).unwrap(),
            TokenVerifier::from_file(&verifying).unwrap(),
        )
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let path = std::env::temp_dir().join(format!("auth-test-{}", uuid::Uuid::new_v4()));
                Self(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const NOW: i64 = 1_795_600_800;

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(NOW)
    }

    #[test]
    fn signed_tokens_verify_with_the_public_key() {
        let (_dir, signer, verifier) = keys();
        let claims = Claims::device("raspi-01", now());
        let token = signer.sign(&claims).unwrap();
        assert_eq!(verifier.verify(&token).unwrap(), claims);
        let app = Claims::app("dashboard", Role::Reader, 3600, now());
        assert_eq!(
            verifier.verify(&signer.sign(&app).unwrap()).unwrap().role,
            Role::Reader
        );
    }

    #[test]
    fn the_private_key_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, _, _) = keys();
        let mode = std::fs::metadata(dir.0.join(SIGNING_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            generate_key_pair(&dir.0, false).is_err(),
            "an existing key is not overwritten"
        );
    }

    #[test]
    fn expired_tampered_foreign_and_unsigned_tokens_are_refused() {
        let (_dir, signer, verifier) = keys();
        let expired = Claims::app("x", Role::Reader, 0, now() - 3600);
        assert!(matches!(
            verifier.verify(&signer.sign(&expired).unwrap()),
            Err(AuthError::Expired)
        ));

        let (_other_dir, other_signer, _) = keys();
        let foreign = other_signer
            .sign(&Claims::device("raspi-01", now()))
            .unwrap();
        assert!(matches!(
            verifier.verify(&foreign),
            Err(AuthError::Invalid(_))
        ));

        // change the payload of a valid token: the signature no longer matches
        let token = signer.sign(&Claims::device("raspi-01", now())).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let forged_payload = base64url(&serde_json::json!({"iss": ISSUER, "sub": "raspi-02", "role": "device", "jti": "x", "iat": now()}).to_string());
        let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert!(verifier.verify(&tampered).is_err());

        // alg: none, no signature
        let none = format!(
            "{}.{}.",
            base64url(r#"{"alg":"none","typ":"JWT"}"#),
            forged_payload
        );
        assert!(verifier.verify(&none).is_err());
        // HS256 signed with the public key as the secret (the classic confusion attack)
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims::device("raspi-02", now()),
            &EncodingKey::from_secret(b"anything"),
        )
        .unwrap();
        assert!(verifier.verify(&hs).is_err());
        assert!(verifier.verify("not a token").is_err());

        // another issuer
        let mut claims = Claims::device("raspi-01", now());
        claims.iss = "someone-else".into();
        assert!(verifier.verify(&signer.sign(&claims).unwrap()).is_err());
    }

    fn base64url(text: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    }

    #[test]
    fn the_cache_answers_as_the_verifier_does() {
        let (_dir, signer, verifier) = keys();
        let cached = CachedVerifier::new(verifier, 2);
        let token = signer.sign(&Claims::device("raspi-01", now())).unwrap();
        for _ in 0..3 {
            assert_eq!(cached.verify(&token).unwrap().sub, "raspi-01");
        }
        let mut forged = token.clone();
        forged.pop();
        assert!(
            cached.verify(&forged).is_err(),
            "another string is checked in full"
        );
        // expiry is checked on every use, also of a token verified while it was valid
        let short = signer
            .sign(&Claims::app("x", Role::Reader, 1, now() - 30))
            .unwrap();
        assert!(cached.verify(&short).is_ok(), "within the leeway");
        let mut stale = Claims::app("x", Role::Reader, 1, now() - 30);
        stale.exp = Some(now() - 31);
        let stale = signer.sign(&stale).unwrap();
        assert!(matches!(cached.verify(&stale), Err(AuthError::Expired)));
        // bounded
        for i in 0..5 {
            let t = signer
                .sign(&Claims::device(&format!("d{i}"), now()))
                .unwrap();
            cached.verify(&t).unwrap();
        }
        assert!(cached.verified.lock().unwrap().len() <= 2);
    }
}
