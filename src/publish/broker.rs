//! Embedded MQTT 3.1.1 broker (rumqttd) on 127.0.0.1, for tests and the single-host profile.
//!
//! rumqttd 0.20 has no way to stop a broker: its threads run until the process exits, and
//! dropping `EmbeddedBroker` does not free the port. It keeps messages in memory only.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use super::mqtt::LinkError;

/// Large enough for an image per message.
pub const DEFAULT_MAX_PAYLOAD: usize = 8 * 1024 * 1024;
const START_TIMEOUT: Duration = Duration::from_secs(5);

pub struct EmbeddedBroker {
    port: u16,
}

impl EmbeddedBroker {
    /// Starts a broker on 127.0.0.1:`port`; port 0 picks a free one (see `port()`). A port
    /// that something else already listens on is `LinkError::PortInUse`.
    pub fn start(port: u16) -> Result<EmbeddedBroker, LinkError> {
        Self::start_with(port, DEFAULT_MAX_PAYLOAD)
    }

    pub fn start_with(port: u16, max_payload: usize) -> Result<EmbeddedBroker, LinkError> {
        if port != 0 {
            return Self::try_start(port, max_payload);
        }
        // rumqttd cannot report the port it bound, so pick one first; another process may
        // take it in between, hence the retries.
        let mut last = None;
        for _ in 0..3 {
            let free = free_port()?;
            match Self::try_start(free, max_payload) {
                Ok(b) => return Ok(b),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn try_start(port: u16, max_payload: usize) -> Result<EmbeddedBroker, LinkError> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // whatever else listens there would answer the readiness probe below as if it were us
        check_free(addr)?;
        let server = ServerSettings {
            name: format!("takumi-{port}"),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 1,
            connections: ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: max_payload,
                max_inflight_count: 100,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let config = Config {
            id: 0,
            router: RouterConfig {
                max_connections: 1024,
                max_outgoing_packet_count: 200,
                // Per topic log kept in memory; segments grow on demand.
                max_segment_size: (4 * max_payload).max(1 << 20),
                max_segment_count: 4,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
            v4: Some(HashMap::from([(server.name.clone(), server)])),
            ..Default::default()
        };
        let mut broker = Broker::new(config);
        let thread = thread::Builder::new()
            .name(format!("rumqttd-{port}"))
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            })
            .map_err(|e| LinkError::Broker(format!("cannot start thread: {e}")))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(EmbeddedBroker { port });
            }
            // The server thread ends at once when it cannot bind.
            if thread.is_finished() || Instant::now() > deadline {
                return Err(LinkError::Broker(format!("not listening on {addr}")));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `PortInUse` when something already listens on `addr` (on it or on the wildcard address).
fn check_free(addr: SocketAddr) -> Result<(), LinkError> {
    match TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(LinkError::PortInUse { addr }),
        Err(e) => Err(LinkError::Broker(format!("cannot listen on {addr}: {e}"))),
    }
}

fn free_port() -> Result<u16, LinkError> {
    let l = TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| LinkError::Broker(format!("no free port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| LinkError::Broker(format!("no free port: {e}")))
}
