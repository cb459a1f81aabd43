#![no_main]
//! `AggregationJobInitReq`: decode∘encode is the identity on every accepted input.

duet_fuzz::round_trip_target!(duet_messages::dap09::AggregationJobInitReq);
