//! Opening the datastore named on the command line or in the config.

use std::sync::Arc;

use anyhow::{Context, Result};
use duet_core::AggregatorRole;
use duet_store::postgres::PostgresDatastore;
use duet_store::sqlite::SqliteDatastore;
use duet_store::Datastore;

/// Whether `database` names PostgreSQL (a `postgres://` or `postgresql://` URL).
pub fn is_postgres(database: &str) -> bool {
    database.starts_with("postgres://") || database.starts_with("postgresql://")
}

/// Opens a database bound to `role`: a `postgres://` or `postgresql://` URL opens PostgreSQL;
/// anything else is a SQLite path or `sqlite://` URL.
pub async fn open(database: &str, role: AggregatorRole) -> Result<Arc<dyn Datastore>> {
    if is_postgres(database) {
        let store = PostgresDatastore::connect(database).await.with_context(|| {
            format!(
                "could not open the PostgreSQL database '{}' (is the server up and the database created?)",
                redact_password(database)
            )
        })?;
        return Ok(Arc::new(store.with_role(role)));
    }
    let store = SqliteDatastore::connect(database).await.with_context(|| {
        format!("could not open the database '{database}' (is the path writable?)")
    })?;
    Ok(Arc::new(store.with_role(role)))
}

/// The URL with any password replaced, for error messages.
fn redact_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Setting a password only fails for URLs that cannot have one, and this one has one.
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_password;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_password("postgres://duet:secret@db.example:5432/duet"),
            "postgres://duet:***@db.example:5432/duet"
        );
        assert_eq!(
            redact_password("postgres://duet@db.example/duet"),
            "postgres://duet@db.example/duet"
        );
        assert_eq!(redact_password("./duet.sqlite"), "./duet.sqlite");
    }
}
