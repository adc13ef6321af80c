//! Replicas of the real binary that share one Redis (see `redis_server`) and one username hash
//! key, as a fleet does.

use super::process::ServiceProcess;
use super::redis_server::RedisServer;
use super::{CLIENT_ID, FakeCognito};

/// The `USERNAME_HASH_KEY_FILE` every replica of a [`Fleet`] shares.
const HASH_KEY: &[u8] = b"shared-limits-test-username-hash-key";

/// Replicas of the real binary that share one Redis and one username hash key.
pub struct Fleet {
    _dir: tempfile::TempDir,
    key_file: String,
}

impl Fleet {
    /// A fleet whose replicas share a fresh key file.
    pub fn keyed() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("hash-key");
        std::fs::write(&key_file, HASH_KEY).unwrap();
        Self {
            key_file: key_file.to_str().unwrap().to_owned(),
            _dir: dir,
        }
    }

    /// A replica on `redis`, once it has connected.
    pub async fn replica(
        &self,
        redis: &RedisServer,
        cognito: &FakeCognito,
        extra: &[(&str, &str)],
    ) -> ServiceProcess {
        self.replica_on(&redis.url, cognito, extra).await
    }

    /// A replica on the Redis at `url`, once it has connected.
    pub async fn replica_on(
        &self,
        url: &str,
        cognito: &FakeCognito,
        extra: &[(&str, &str)],
    ) -> ServiceProcess {
        let mut vars = vec![
            ("COGNITO_CLIENT_ID", CLIENT_ID),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", cognito.url.as_str()),
            ("RATE_LIMIT_REDIS_URL", url),
            ("USERNAME_HASH_KEY_FILE", self.key_file.as_str()),
        ];
        vars.extend_from_slice(extra);
        let mut replica = ServiceProcess::start(&vars).await;
        replica
            .wait_for_line(|e| e["message"] == "rate-limit backend connected")
            .await;
        replica
    }
}
