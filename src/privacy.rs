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
#[derive(Clone, Debug)]
pub struct UsernameHasher {
    key: HmacKey,
}

impl UsernameHasher {
    /// A hasher under `key`.
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        let key = SecretSlice::from(key.into());
        Self {
            key: HmacKey::new(key.expose_secret()),
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
        self.key.mac(&[user.key().as_bytes()])
    }

    /// The pseudonym that stands for `user` in log lines: the first 16 bytes of the HMAC of
    /// its key, as 32 hex digits.
    pub(crate) fn pseudonym(&self, user: PoolUser<'_>) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut pseudonym = String::with_capacity(2 * PSEUDONYM_BYTES);
        for byte in &self.digest(user)[..PSEUDONYM_BYTES] {
            pseudonym.push(HEX[usize::from(byte >> 4)].into());
            pseudonym.push(HEX[usize::from(byte & 0xf)].into());
        }
        pseudonym
    }
}

/// An HMAC-SHA256 key, kept as the two hash states its padded key leaves (the inner and the
/// outer one), so that each MAC hashes only its message: two SHA-256 compressions fewer each
/// time. Those states stand for the key, so they are never printed. Like the secrets they
/// are made from, they live as long as the process (or until the app client's secret file
/// changes) and are not wiped from memory when dropped: the hmac crate of this version offers
/// no zeroizing, and a copy of the padded key is no more than what the secret file holds.
#[derive(Clone)]
pub struct HmacKey(Hmac<Sha256>);

impl std::fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HmacKey(<redacted>)")
    }
}

impl HmacKey {
    /// The key `key`.
    pub fn new(key: &[u8]) -> Self {
        Self(Hmac::new_from_slice(key).expect("HMAC takes a key of any length"))
    }

    /// HMAC-SHA256 of the concatenated `parts` under this key.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = self.0.clone();
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    /// HMAC-SHA256 of `parts`, each prefixed by its length (eight bytes, big-endian), so that
    /// no two lists of parts hash alike.
    pub fn mac_framed(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = self.0.clone();
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }
}

/// HMAC-SHA256 of the concatenated `parts` under `key`: the one keyed hash of the service.
pub fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    HmacKey::new(key).mac(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Username;

    fn user(name: &str) -> Username {
        Username::parse("username", name.to_owned()).unwrap()
    }

    #[test]
    fn hmac_keys_give_rfc_4231s_mac() {
        // RFC 4231, test case 2.
        let mac = HmacKey::new(b"Jefe").mac(&[b"what do ya ", b"want for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            format!("{:?}", HmacKey::new(b"Jefe")),
            "HmacKey(<redacted>)"
        );
    }

    #[test]
    fn framed_macs_hash_each_part_after_its_length() {
        // The idempotency keys replicas share on Redis: the bytes hashed must not change.
        let key = HmacKey::new(b"key");
        let mut framed = Vec::new();
        for part in [&b"ab"[..], b"", b"c"] {
            framed.extend_from_slice(&(part.len() as u64).to_be_bytes());
            framed.extend_from_slice(part);
        }
        assert_eq!(key.mac_framed(&[b"ab", b"", b"c"]), key.mac(&[&framed]));
        assert_ne!(
            key.mac_framed(&[b"ab", b"c"]),
            key.mac_framed(&[b"a", b"bc"])
        );
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
        // The known pseudonym of a known key: the first 16 bytes of the HMAC, in hex.
        let known = UsernameHasher::new(b"key".to_vec()).pseudonym(PoolUser::new(None, &lower));
        let digest = hmac(b"key", &[b"alice@example.com"]);
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(known, hex);
    }

    #[test]
    fn a_user_is_the_same_in_every_client_of_a_pool_and_another_in_another_pool() {
        let hasher = UsernameHasher::new(b"key".to_vec());
        let alice = user("alice");
        let in_pool = |pool| hasher.digest(PoolUser::new(pool, &alice));
        assert_eq!(in_pool(Some("eu-west-1_A")), in_pool(Some("eu-west-1_A")));
        assert_ne!(in_pool(Some("eu-west-1_A")), in_pool(Some("eu-west-1_B")));
        assert_ne!(in_pool(Some("eu-west-1_A")), in_pool(None));
        // With no pool the key is the normalised username alone, as before pools were named.
        assert_eq!(in_pool(None), hmac(b"key", &[b"alice"]));
    }
}
