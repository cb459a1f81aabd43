//! Opening the datastore named on the command line or in the config.

use std::sync::Arc;

use anyhow::{Context, Result};
use duet_core::AggregatorRole;
use duet_store::sqlite::SqliteDatastore;
use duet_store::Datastore;

/// Opens a database (a SQLite path or `sqlite://` URL) bound to `role`.
pub async fn open(database: &str, role: AggregatorRole) -> Result<Arc<dyn Datastore>> {
    if database.starts_with("postgres://") || database.starts_with("postgresql://") {
        anyhow::bail!(
            "PostgreSQL is not supported by this build yet; use a SQLite file path such as ./duet.sqlite"
        );
    }
    let store = SqliteDatastore::connect(database).await.with_context(|| {
        format!("could not open the database '{database}' (is the path writable?)")
    })?;
    Ok(Arc::new(store.with_role(role)))
}
