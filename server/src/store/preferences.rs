//! Preference feedback, stored beside the pairs: deduplicated by content hash per adapter,
//! counted towards the adapter's next job, paged and deleted by id as pairs are.

use crate::dataset::preference::Preference;
use crate::sql_params;

use super::database::Session;
use super::{unix_time, Store, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct StoredPreference {
    pub id: i64,
    pub hash: String,
    pub preference: Preference,
    pub created_at: i64,
}

/// Stores the preferences not already held for `adapter`, inside the caller's transaction,
/// and returns how many were new.
pub(super) fn insert_preferences_in(s: &mut dyn Session, adapter: &str, preferences: &[Preference]) -> Result<usize, StoreError> {
    let now = unix_time();
    let mut stored = 0;
    for preference in preferences {
        stored += s.execute(
            "INSERT INTO preferences (adapter, hash, preference, created_at) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
            sql_params![adapter, preference.content_hash(), serde_json::to_string(preference)?, now],
        )?;
    }
    Ok(stored)
}

impl Store {
    /// Up to `limit` preferences of `adapter` with ids above `after`, oldest first.
    pub fn preferences(&self, adapter: &str, after: i64, limit: usize) -> Result<Vec<StoredPreference>, StoreError> {
        self.preferences_in(adapter, after, i64::MAX, limit)
    }

    /// The preferences of `adapter` with ids up to `last_id`, oldest first (a job's snapshot).
    pub fn preferences_through(&self, adapter: &str, last_id: i64) -> Result<Vec<StoredPreference>, StoreError> {
        self.preferences_in(adapter, 0, last_id, usize::MAX)
    }

    fn preferences_in(&self, adapter: &str, after: i64, through: i64, limit: usize) -> Result<Vec<StoredPreference>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(|s| {
            s.query(
                "SELECT id, hash, preference, created_at FROM preferences
                 WHERE adapter = ?1 AND id > ?2 AND id <= ?3 ORDER BY id LIMIT ?4",
                sql_params![adapter, after, through, limit],
            )?
            .iter()
            .map(|r| {
                Ok(StoredPreference {
                    id: r.int(0)?,
                    hash: r.text(1)?,
                    preference: serde_json::from_str(&r.text(2)?)?,
                    created_at: r.int(3)?,
                })
            })
            .collect()
        })
    }

    /// The id of `adapter`'s newest preference (0 when it has none).
    pub fn last_preference_id(&self, adapter: &str) -> Result<i64, StoreError> {
        self.with(|s| Ok(s.query_one("SELECT COALESCE(MAX(id), 0) FROM preferences WHERE adapter = ?1", sql_params![adapter])?.int(0)?))
    }

    pub fn count_preferences(&self, adapter: &str) -> Result<usize, StoreError> {
        self.with(|s| Ok(s.query_one("SELECT COUNT(*) FROM preferences WHERE adapter = ?1", sql_params![adapter])?.int(0)? as usize))
    }

    /// Deletes the preferences with the given ids (all of the adapter's when `ids` is None).
    pub fn delete_preferences(&self, adapter: &str, ids: Option<&[i64]>) -> Result<usize, StoreError> {
        self.with(|s| match ids {
            None => Ok(s.execute("DELETE FROM preferences WHERE adapter = ?1", sql_params![adapter])?),
            Some(ids) => ids.iter().try_fold(0, |n, id| {
                Ok(n + s.execute("DELETE FROM preferences WHERE adapter = ?1 AND id = ?2", sql_params![adapter, *id])?)
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{adapter, stores};
    use super::super::{Adoption, NewFeedback};
    use super::*;
    use crate::access::Scope;
    use crate::dataset::{Conversation, Message};

    fn preference(chosen: &str) -> Preference {
        let user = Message { role: "user".into(), content: "q".into() };
        Preference { prompt: vec![user], chosen: chosen.into(), rejected: "no".into() }
    }

    fn pair() -> Conversation {
        let m = |role: &str, content: &str| Message { role: role.into(), content: content.into() };
        Conversation { messages: vec![m("user", "q"), m("assistant", "a")] }
    }

    #[test]
    fn preferences_are_stored_beside_pairs_deduplicated_paged_and_deleted() {
        for (store, location, dir) in stores() {
            let row = adapter("x", Scope::Tune);
            let first = NewFeedback { pairs: &[pair()], preferences: &[preference("a"), preference("b")] };
            let created = store.insert_or_get_adapter(&row, &serde_json::json!({}), first, |v0| std::fs::create_dir_all(v0)).unwrap();
            assert!(matches!(created, Adoption::Stored { created: true, inserted } if inserted.stored == 3 && inserted.pairs_since_training == 3));
            let again = store.insert_feedback("x", NewFeedback { pairs: &[], preferences: &[preference("b"), preference("c")] }).unwrap();
            assert_eq!((again.stored, again.duplicates, again.pairs_since_training), (1, 1, 4));
            drop(store);
            let store = Store::open_at(&location, dir.path()).unwrap();
            let page = store.preferences("x", 0, 2).unwrap();
            assert_eq!(page.iter().map(|p| p.preference.chosen.as_str()).collect::<Vec<_>>(), ["a", "b"], "{location}");
            let rest = store.preferences("x", page[1].id, 10).unwrap();
            assert_eq!(rest.len(), 1);
            assert_eq!(store.last_preference_id("x").unwrap(), rest[0].id);
            assert_eq!(store.preferences_through("x", page[1].id).unwrap().len(), 2);
            assert_eq!(store.delete_preferences("x", Some(&[page[0].id])).unwrap(), 1);
            assert_eq!((store.count_preferences("x").unwrap(), store.count_pairs("x").unwrap()), (2, 1));
            assert!(store.delete_adapter("x").unwrap());
            assert_eq!(store.count_preferences("x").unwrap(), 0, "{location}: the adapter's preferences go with it");
        }
    }
}
