//! Keyed hashing of usernames: the pseudonym that stands for a user in log lines, and the key
//! of the simulated delivery details that enumeration protection answers for unknown users
//! whose usernames have no recognisable shape. Both are
//! HMAC-SHA256 under a key that never leaves the process, so the same username always maps to
//! the same value while nobody without the key can tell which username it was.

use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretSlice};
use sha2::Sha256;

use crate::domain::PoolUser;

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

    /// The HMAC of the user's key: the normalised (lowercase) username, after its pool's id.
    pub(crate) fn digest(&self, user: PoolUser<'_>) -> [u8; 32] {
        hmac(self.key.expose_secret(), &[user.key().as_bytes()])
    }

    /// The pseudonym that stands for `user` in log lines: the first 16 bytes of the HMAC of
    /// its key, as 32 hex digits.
    pub(crate) fn pseudonym(&self, user: PoolUser<'_>) -> String {
        self.digest(user)[..PSEUDONYM_BYTES]
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
    use crate::domain::Username;

    fn user(name: &str) -> Username {
        Username::parse("username", name.to_owned()).unwrap()
    }

    #[test]
    fn pseudonyms_differ_between_keys() {
        let alice = user("alice");
        assert_ne!(
            UsernameHasher::derived(b"secret", "test").pseudonym(PoolUser::new(None, &alice)),
            UsernameHasher::derived(b"other", "test").pseudonym(PoolUser::new(None, &alice))
        );
    }

    #[test]
    fn pseudonyms_hide_the_username_and_ignore_case() {
        let hasher = UsernameHasher::random();
        let (upper, lower) = (user("Alice@Example.com"), user("alice@example.com"));
        let pseudonym = hasher.pseudonym(PoolUser::new(None, &upper));
        assert_eq!(pseudonym.len(), 32);
        assert!(!pseudonym.contains("alice"));
        assert_eq!(pseudonym, hasher.pseudonym(PoolUser::new(None, &lower)));
        assert!(!format!("{hasher:?}").contains(|c: char| c.is_ascii_digit()));
    }

    #[test]
    fn a_user_is_the_same_in_every_client_of_a_pool_and_another_in_another_pool() {
        let hasher = UsernameHasher::random();
        let alice = user("alice");
        let in_pool = |pool| hasher.digest(PoolUser::new(pool, &alice));
        assert_eq!(in_pool(Some("eu-west-1_A")), in_pool(Some("eu-west-1_A")));
        assert_ne!(in_pool(Some("eu-west-1_A")), in_pool(Some("eu-west-1_B")));
        assert_ne!(in_pool(Some("eu-west-1_A")), in_pool(None));
        // With no pool the key is the normalised username alone, as before pools were named.
        assert_eq!(in_pool(None), hmac(hasher.key.expose_secret(), &[b"alice"]));
    }
}
