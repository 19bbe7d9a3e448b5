//! Helpers shared by the end-to-end tests.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tonic::transport::Channel;

/// A listener on a free loopback port.
pub async fn bind_local() -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// A client channel to a server on `addr`.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}
