//! Stored Responses: what `GET /v1/responses/{id}` returns and what a later request's
//! `previous_response_id` continues. The store keeps both as JSON text; their shapes are the
//! responses service's.

use crate::sql_params;

use super::{unix_time, Store, StoreError};

/// One stored response: the object as served, and the conversation it ends (JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub id: String,
    pub body: String,
    pub conversation: String,
    pub created_at: i64,
}

impl Store {
    /// Stores a response under its (new, random) id.
    pub fn insert_response(&self, id: &str, body: &str, conversation: &str) -> Result<(), StoreError> {
        self.with(|s| {
            s.execute(
                "INSERT INTO responses (id, body, conversation, created_at) VALUES (?1, ?2, ?3, ?4)",
                sql_params![id, body, conversation, unix_time()],
            )?;
            Ok(())
        })
    }

    pub fn response(&self, id: &str) -> Result<Option<StoredResponse>, StoreError> {
        self.with(|s| {
            s.query_opt("SELECT id, body, conversation, created_at FROM responses WHERE id = ?1", sql_params![id])?
                .map(|r| Ok(StoredResponse { id: r.text(0)?, body: r.text(1)?, conversation: r.text(2)?, created_at: r.int(3)? }))
                .transpose()
        })
    }

    /// Deletes a response; false when there was none.
    pub fn delete_response(&self, id: &str) -> Result<bool, StoreError> {
        self.with(|s| Ok(s.execute("DELETE FROM responses WHERE id = ?1", sql_params![id])? > 0))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::stores;
    use super::*;

    #[test]
    fn responses_are_stored_read_back_after_reopening_and_deleted() {
        for (store, location, dir) in stores() {
            store.insert_response("resp_1", r#"{"id":"resp_1"}"#, "[]").unwrap();
            assert!(store.insert_response("resp_1", "{}", "[]").is_err(), "{location}: an id is stored once");
            drop(store);
            let store = Store::open_at(&location, dir.path()).unwrap();
            let stored = store.response("resp_1").unwrap().expect("stored");
            assert_eq!((stored.body.as_str(), stored.conversation.as_str()), (r#"{"id":"resp_1"}"#, "[]"), "{location}");
            assert_eq!(store.response("resp_2").unwrap(), None);
            assert!(store.delete_response("resp_1").unwrap());
            assert!(!store.delete_response("resp_1").unwrap(), "{location}: deleted once");
            assert_eq!(store.response("resp_1").unwrap(), None);
        }
    }
}
