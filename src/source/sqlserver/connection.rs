//! Connecting, over TCP, with TLS as the connection string asks (the string is read in
//! [`crate::config::ado`]).

use tokio::net::TcpStream;
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

use super::MssqlError;
use crate::config::{ado::config, Secret};

/// A connection to the server.
pub type Client = tiberius::Client<Compat<TcpStream>>;

/// Connect and log in, following the server's redirection once (Azure SQL's gateway).
pub async fn connect(url: &Secret) -> Result<Client, MssqlError> {
    let mut config = config(url).map_err(|e| MssqlError::Definite(format!("source.url: {e}")))?;
    config.application_name("fhir-cdc");
    let tcp = |addr: String| async move {
        let stream = TcpStream::connect(&addr).await.map_err(|e| {
            MssqlError::Transient(format!("connecting to SQL Server at {addr}: {e}"))
        })?;
        let _ = stream.set_nodelay(true);
        Ok::<_, MssqlError>(stream.compat_write())
    };
    let login = MssqlError::query("logging in to SQL Server");
    match Client::connect(config.clone(), tcp(config.get_addr()).await?).await {
        Err(tiberius::error::Error::Routing { host, port }) => {
            config.host(&host);
            config.port(port);
            Client::connect(config.clone(), tcp(config.get_addr()).await?)
                .await
                .map_err(login)
        }
        connected => connected.map_err(login),
    }
}
