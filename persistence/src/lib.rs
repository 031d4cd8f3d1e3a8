//! Durable event log for kvindex (see the persistence issue). Not implemented yet.
