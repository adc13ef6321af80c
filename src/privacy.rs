//! Keyed hashing of usernames: the pseudonym that stands for a user in log lines, and the key
//! of the simulated delivery details that enumeration protection answers for unknown users
//! whose usernames have no recognisable shape. Both are
//! HMAC-SHA256 under a key that never leaves the process, so the same username always maps to
//! the same value while nobody without the key can tell which username it was.

use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretSlice};
use sha2::Sha256;

use crate::domain::Username;

/// Bytes of the HMAC shown as a user's pseudonym in logs and audit events (hex-encoded).
const PSEUDONYM_BYTES: usize = 16;

/// Hashes usernames under one secret key.
#[derive(Clone)]
pub struct UsernameHasher {
    key: SecretSlice<u8>,
}

impl std::fmt::Debug for UsernameHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UsernameHasher(<key redacted>)")
    }
}

impl UsernameHasher {
    /// A hasher under `key`.
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        Self {
            key: SecretSlice::from(key.into()),
        }
    }

    /// A hasher under a fresh random key: stable for this process only.
    pub fn random() -> Self {
        let mut key = vec![0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Self::new(key)
    }

    /// A hasher whose key is derived from `secret` under a purpose label, so replicas that
    /// share the secret agree and the secret itself is never used twice for different ends.
    pub fn derived(secret: &[u8], purpose: &str) -> Self {
        Self::new(hmac(secret, &[purpose.as_bytes()]).to_vec())
    }

    /// The HMAC of the normalised (lowercase) username.
    pub fn digest(&self, username: &Username) -> [u8; 32] {
        hmac(
            self.key.expose_secret(),
            &[username.normalised().as_bytes()],
        )
    }

    /// The pseudonym that stands for `username` in log lines: the first 16 bytes of the HMAC of
    /// the normalised (lowercase) username, as 32 hex digits.
    pub fn pseudonym(&self, username: &Username) -> String {
        self.digest(username)[..PSEUDONYM_BYTES]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// HMAC-SHA256 of the concatenated `parts` under `key`: the one keyed hash of the service.
pub fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> Username {
        Username::parse("username", name.to_owned()).unwrap()
    }

    #[test]
    fn pseudonyms_differ_between_keys() {
        assert_ne!(
            UsernameHasher::derived(b"secret", "test").pseudonym(&user("alice")),
            UsernameHasher::derived(b"other", "test").pseudonym(&user("alice"))
        );
    }

    #[test]
    fn pseudonyms_hide_the_username_and_ignore_case() {
        let hasher = UsernameHasher::random();
        let pseudonym = hasher.pseudonym(&user("Alice@Example.com"));
        assert_eq!(pseudonym.len(), 32);
        assert!(!pseudonym.contains("alice"));
        assert_eq!(pseudonym, hasher.pseudonym(&user("alice@example.com")));
        assert!(!format!("{hasher:?}").contains(|c: char| c.is_ascii_digit()));
    }
}
