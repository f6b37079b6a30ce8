//! The built-in dialects' event-name tables, kept as data in `event_names.toml`.

use std::collections::BTreeMap;

use super::RenderError;

/// The tables of `event_names.toml`: table name -> producer type -> wire name.
#[derive(Debug)]
pub(super) struct EventNames(BTreeMap<String, BTreeMap<String, String>>);

impl EventNames {
    /// Parses the embedded tables.
    pub(super) fn builtin() -> Result<Self, RenderError> {
        Self::parse(include_str!("event_names.toml"))
    }

    fn parse(text: &str) -> Result<Self, RenderError> {
        toml::from_str(text).map(Self).map_err(|e| RenderError::EventNames(e.to_string()))
    }

    /// Wire name of `producer_type` in `table`, if listed.
    pub(super) fn get(&self, table: &str, producer_type: &str) -> Option<&str> {
        self.0.get(table)?.get(producer_type).map(String::as_str)
    }

    #[cfg(test)]
    pub(super) fn tables(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_tables_parse_and_cover_design_table() {
        let n = EventNames::builtin().unwrap();
        let want = [
            ("antcrm", "contact.created", "CONTACT_CREATE"),
            ("antcrm", "contact.updated", "CONTACT_CHANGE"),
            ("antcrm", "contact.stage_changed", "CONTACT_CHANGE_STAGE"),
            ("antcrm", "task.created", "TASK_CREATE"),
            ("antcrm", "task.updated", "TASK_CHANGE"),
            ("antcrm", "ticket.created", "TICKET_CREATE"),
            ("antcrm", "ticket.updated", "TICKET_CHANGE"),
            ("antcrm", "deal.created", "DEAL_CREATE"),
            ("antcrm", "deal.updated", "DEAL_CHANGE"),
            ("antcrm", "order.created", "DEAL_CREATE"),
            ("antcrm", "order.updated", "DEAL_CHANGE"),
            ("antcrm", "note.created", "NOTE_CREATE"),
            ("teamcrop", "contact.created", "customer.add"),
            ("teamcrop", "contact.updated", "customer.edit"),
            ("teamcrop", "ticket.created", "supportticket.add"),
            ("teamcrop", "order.created", "order.add"),
            ("teamcrop", "order.updated", "order.edit"),
            ("teamcrop", "order.item_added", "order.additem"),
            ("teamcrop", "order.item_updated", "order.edititem"),
            ("teamcrop", "order.item_deleted", "order.deleteitem"),
            ("teamcrop", "product.created", "product.add"),
            ("teamcrop", "product.updated", "product.edit"),
            ("teamcrop", "product.deleted", "product.delete"),
            ("doopage", "contact.created", "customer_created"),
            ("doopage", "contact.updated", "customer_updated"),
            ("doopage", "contact.stage_changed", "customer_pipeline_updated"),
            ("doopage", "order.created", "order_created"),
            ("doopage", "order.updated", "order_updated"),
            ("doopage", "note.created", "note_changed"),
        ];
        for (table, from, to) in want {
            assert_eq!(n.get(table, from), Some(to), "{table} {from}");
        }
        assert_eq!(n.get("doopage", "contact.stage_changed"), Some("customer_pipeline_updated"));
        assert_eq!(n.get("teamcrop", "contact.stage_changed"), None);
    }

    #[test]
    fn every_table_belongs_to_a_builtin_dialect() {
        let n = EventNames::builtin().unwrap();
        let used: Vec<&str> = super::super::Builtin::ALL.iter().filter_map(|b| b.table()).collect();
        for table in n.tables() {
            assert!(used.contains(&table), "table [{table}] is used by no dialect (typo?)");
        }
    }

    #[test]
    fn malformed_table_is_a_clear_error() {
        let err = EventNames::parse("[antcrm]\n\"a\" = 1\n").unwrap_err();
        assert!(err.to_string().starts_with("built-in event name table is invalid"), "{err}");
    }
}
