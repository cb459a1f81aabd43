//! Opening the datastore named on the command line or in the config.

use std::sync::Arc;

use anyhow::{Context, Result};
use duet_core::AggregatorRole;
use duet_store::postgres::PostgresDatastore;
use duet_store::sqlite::{SqliteDatastore, SqliteSetup};
use duet_store::Datastore;

/// Whether `database` names PostgreSQL (a `postgres://` or `postgresql://` URL).
pub fn is_postgres(database: &str) -> bool {
    database.starts_with("postgres://") || database.starts_with("postgresql://")
}

/// A `--sqlite-page-size` flag's value.
pub fn parse_page_size(text: &str) -> Result<u32, String> {
    let size: u32 = text
        .parse()
        .map_err(|_| format!("'{text}' is not a page size in bytes"))?;
    duet_store::sqlite::check_page_size(size)?;
    Ok(size)
}

/// Opens a database bound to `role`: a `postgres://` or `postgresql://` URL opens PostgreSQL;
/// anything else is a SQLite path or `sqlite://` URL.
pub async fn open(database: &str, role: AggregatorRole) -> Result<Arc<dyn Datastore>> {
    open_with(database, role, SqliteSetup::default()).await
}

/// [`open`], with a SQLite database set up as `sqlite` says.
pub async fn open_with(
    database: &str,
    role: AggregatorRole,
    sqlite: SqliteSetup,
) -> Result<Arc<dyn Datastore>> {
    if is_postgres(database) {
        let store = PostgresDatastore::connect(database).await.with_context(|| {
            format!(
                "could not open the PostgreSQL database '{}' (is the server up and the database created?)",
                redact_password(database)
            )
        })?;
        return Ok(Arc::new(store.with_role(role)));
    }
    let store = SqliteDatastore::connect_setup(database, sqlite)
        .await
        .with_context(|| {
            format!("could not open the database '{database}' (is the path writable?)")
        })?;
    Ok(Arc::new(store.with_role(role)))
}

/// The URL with any password (in its user part or its query) replaced, for error messages; a
/// URL that does not parse is not shown at all, lest it hold one.
fn redact_password(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return match url.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://… (not a valid URL)"),
            None => url.to_string(),
        };
    };
    if parsed.password().is_some() {
        // Setting a password only fails for URLs that cannot have one, and this one has one.
        let _ = parsed.set_password(Some("***"));
    }
    if parsed.query_pairs().any(|(k, _)| k.contains("password")) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if k.contains("password") {
                    "***".to_string()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
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
        assert_eq!(
            redact_password("postgres://duet@db.example/duet?password=secret&sslmode=require"),
            "postgres://duet@db.example/duet?password=***&sslmode=require"
        );
        assert_eq!(
            redact_password("postgres://duet:secret@[bad/duet"),
            "postgres://… (not a valid URL)"
        );
    }
}
