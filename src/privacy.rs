//! Keyed hashing of usernames: the pseudonym that stands for a user in log lines, and the
//! simulated delivery details that enumeration protection answers for unknown users. Both are
//! HMAC-SHA256 under a key that never leaves the process, so the same username always maps to
//! the same value while nobody without the key can tell which username it was.

use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretSlice};
use sha2::Sha256;

use crate::domain::{CodeDelivery, DeliveryMedium, Username};

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

    fn digest(&self, username: &Username) -> [u8; 32] {
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

    /// Delivery details of the same shape as a real email delivery (`a***@e***`), the same for
    /// the same username every time.
    pub fn simulated_delivery(&self, username: &Username) -> CodeDelivery {
        let digest = self.digest(username);
        let letter = |byte: u8| char::from(b'a' + byte % 26);
        CodeDelivery {
            destination: format!("{}***@{}***", letter(digest[0]), letter(digest[1])),
            medium: DeliveryMedium::Email,
            attribute_name: "email".to_owned(),
        }
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
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
    fn the_same_username_always_gets_the_same_simulated_answer() {
        let hasher = UsernameHasher::derived(b"secret", "test");
        let first = hasher.simulated_delivery(&user("nobody@example.com"));
        let again = UsernameHasher::derived(b"secret", "test")
            .simulated_delivery(&user("nobody@example.com"));
        assert_eq!(first, again);
        assert_eq!(first.medium, DeliveryMedium::Email);
        assert_eq!(first.attribute_name, "email");
        let bytes = first.destination.as_bytes();
        assert_eq!(first.destination.len(), 9, "{}", first.destination);
        assert!(bytes[0].is_ascii_lowercase() && bytes[5].is_ascii_lowercase());
        assert_eq!(&first.destination[1..5], "***@");
        assert_eq!(&first.destination[6..], "***");
    }

    #[test]
    fn simulated_answers_vary_between_usernames_and_keys() {
        let hasher = UsernameHasher::derived(b"secret", "test");
        let destinations: std::collections::HashSet<_> = (0..50)
            .map(|i| {
                hasher
                    .simulated_delivery(&user(&format!("user{i}")))
                    .destination
            })
            .collect();
        assert!(destinations.len() > 10, "{destinations:?}");
        assert_ne!(
            hasher.pseudonym(&user("alice")),
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
