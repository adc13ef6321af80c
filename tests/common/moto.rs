//! moto's Cognito emulator as a child process on a free loopback port, an admin client for
//! setting up pools (the only thing here that uses credentials: dummy ones moto ignores), and a
//! recording TCP proxy that reads the confirmation code moto returns in a response header.

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_cognitoidentityprovider::Client;
use aws_sdk_cognitoidentityprovider::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_cognitoidentityprovider::types::{
    AccountRecoverySettingType, AttributeType, ExplicitAuthFlowsType, MessageActionType,
    RecoveryOptionNameType, RecoveryOptionType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::tools::moto_server;

/// The region every test pool lives in.
pub const REGION: &str = "us-east-1";

/// A running moto server, killed when dropped.
pub struct Moto {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its address.
    pub addr: SocketAddr,
    child: Child,
}

/// A user pool and its app client (with a secret).
#[derive(Debug, Clone)]
pub struct Pool {
    pub pool_id: String,
    pub client_id: String,
    pub client_secret: String,
}

/// How a pool lets users recover their accounts.
#[derive(Debug, Clone, Copy)]
pub enum Recovery {
    VerifiedEmail,
    AdminOnly,
}

impl Moto {
    /// Starts moto on a free loopback port and waits until it accepts connections.
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut moto = Self {
            url: format!("http://{addr}"),
            addr,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Some(status) = moto.child.try_wait().unwrap() {
                panic!("moto_server exited with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    /// An admin client with dummy credentials, for set-up and checks only.
    pub fn admin(&self) -> Client {
        let config = aws_sdk_cognitoidentityprovider::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(&self.url)
            .credentials_provider(Credentials::new("moto", "moto", None, None, "tests"))
            .build();
        Client::from_conf(config)
    }

    /// Creates a pool with `recovery`, an app client with a secret that allows
    /// USER_PASSWORD_AUTH, and returns them.
    pub async fn create_pool(&self, recovery: Recovery) -> Pool {
        let admin = self.admin();
        let mechanism = match recovery {
            Recovery::VerifiedEmail => RecoveryOptionNameType::VerifiedEmail,
            Recovery::AdminOnly => RecoveryOptionNameType::AdminOnly,
        };
        let pool = admin
            .create_user_pool()
            .pool_name("password-recovery-e2e")
            .account_recovery_setting(
                AccountRecoverySettingType::builder()
                    .recovery_mechanisms(
                        RecoveryOptionType::builder()
                            .name(mechanism)
                            .priority(1)
                            .build()
                            .unwrap(),
                    )
                    .build(),
            )
            .send()
            .await
            .expect("CreateUserPool");
        let pool_id = pool.user_pool().unwrap().id().unwrap().to_owned();
        let (client_id, client_secret) = self.create_client(&pool_id, true).await;
        Pool {
            pool_id,
            client_id,
            client_secret: client_secret.expect("generated"),
        }
    }

    /// Creates an app client of `pool_id` that allows USER_PASSWORD_AUTH, with a generated
    /// secret when `with_secret`; returns its id and secret.
    pub async fn create_client(
        &self,
        pool_id: &str,
        with_secret: bool,
    ) -> (String, Option<String>) {
        let created = self
            .admin()
            .create_user_pool_client()
            .user_pool_id(pool_id)
            .client_name(if with_secret { "with-secret" } else { "public" })
            .generate_secret(with_secret)
            .explicit_auth_flows(ExplicitAuthFlowsType::AllowUserPasswordAuth)
            .explicit_auth_flows(ExplicitAuthFlowsType::AllowRefreshTokenAuth)
            .send()
            .await
            .expect("CreateUserPoolClient");
        let client = created.user_pool_client().unwrap();
        (
            client.client_id().unwrap().to_owned(),
            client.client_secret().map(str::to_owned),
        )
    }

    /// Creates a confirmed user whose email is verified, with a permanent password.
    pub async fn create_user(&self, pool: &Pool, username: &str, password: &str) {
        let admin = self.admin();
        admin
            .admin_create_user()
            .user_pool_id(&pool.pool_id)
            .username(username)
            .user_attributes(attribute("email", username))
            .user_attributes(attribute("email_verified", "true"))
            .message_action(MessageActionType::Suppress)
            .send()
            .await
            .expect("AdminCreateUser");
        admin
            .admin_set_user_password()
            .user_pool_id(&pool.pool_id)
            .username(username)
            .password(password)
            .permanent(true)
            .send()
            .await
            .expect("AdminSetUserPassword");
    }
}

fn attribute(name: &str, value: &str) -> AttributeType {
    AttributeType::builder()
        .name(name)
        .value(value)
        .build()
        .unwrap()
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The response header in which moto returns the real confirmation code.
const CODE_HEADER: &str = "x-moto-forgot-password-confirmation-code:";

/// A TCP proxy on loopback in front of moto that keeps what moto answers, so a test can read
/// the confirmation code that the service (rightly) does not pass on.
pub struct CodeTap {
    /// `http://127.0.0.1:PORT`: point the service here.
    pub url: String,
    answers: Arc<Mutex<Vec<u8>>>,
}

impl CodeTap {
    /// Starts the proxy in front of `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let answers = Arc::new(Mutex::new(Vec::new()));
        let recorded = answers.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let server = TcpStream::connect(upstream).await.unwrap();
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                        let _ = server_write.shutdown().await;
                    });
                    let mut buffer = [0u8; 8192];
                    while let Ok(n @ 1..) = server_read.read(&mut buffer).await {
                        recorded.lock().unwrap().extend_from_slice(&buffer[..n]);
                        if client_write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = client_write.shutdown().await;
                });
            }
        });
        Self { url, answers }
    }

    /// How many ForgotPassword answers moto gave with a code: how many codes it sent.
    pub fn codes_sent(&self) -> usize {
        let answers = String::from_utf8_lossy(&self.answers.lock().unwrap()).to_lowercase();
        answers.matches(CODE_HEADER).count()
    }

    /// The confirmation code in the latest ForgotPassword answer moto gave.
    pub fn last_code(&self) -> Option<String> {
        let answers = String::from_utf8_lossy(&self.answers.lock().unwrap()).to_lowercase();
        let start = answers.rfind(CODE_HEADER)? + CODE_HEADER.len();
        let end = answers[start..].find("\r\n")? + start;
        // Codes are ASCII ("moto-confirmation-code:123456"), so lowercasing kept them intact.
        Some(answers[start..end].trim().to_owned())
    }
}
