// @generated automatically by Diesel CLI.

diesel::table! {
    app_tokens (id) {
        id -> Text,
        name -> Text,
        role -> Text,
        issued_at -> Timestamptz,
        expires_at -> Timestamptz,
        revoked_at -> Nullable<Timestamptz>,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    command_events (command_id, status) {
        command_id -> Text,
        status -> Text,
        at -> Timestamptz,
        detail -> Text,
    }
}

diesel::table! {
    commands (id) {
        id -> Text,
        device_id -> Text,
        name -> Text,
        args -> Jsonb,
        status -> Text,
        issued_by -> Text,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
        sent_at -> Nullable<Timestamptz>,
        finished_at -> Nullable<Timestamptz>,
        result -> Nullable<Jsonb>,
        deliver_after -> Timestamptz,
    }
}

diesel::table! {
    device_credentials (device_id) {
        device_id -> Text,
        token_id -> Text,
        created_at -> Timestamptz,
        revoked_at -> Nullable<Timestamptz>,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    devices (device_id) {
        device_id -> Text,
        first_seen -> Timestamptz,
        last_seen -> Timestamptz,
        metrics -> Array<Nullable<Text>>,
    }
}

diesel::table! {
    reading_conflicts (device_id, reading_id, variant) {
        device_id -> Text,
        reading_id -> Text,
        variant -> Text,
        ts -> Timestamptz,
        ts_assigned -> Bool,
        metrics -> Jsonb,
        stored_ts -> Timestamptz,
        reason -> Text,
        received_at -> Timestamptz,
    }
}

diesel::table! {
    reading_ids (device_id, reading_id) {
        device_id -> Text,
        reading_id -> Text,
        ts -> Timestamptz,
        ts_assigned -> Bool,
        first_seen -> Timestamptz,
    }
}

diesel::table! {
    readings (device_id, ts, reading_id) {
        device_id -> Text,
        ts -> Timestamptz,
        reading_id -> Text,
        metrics -> Jsonb,
    }
}

diesel::joinable!(command_events -> commands (command_id));

diesel::allow_tables_to_appear_in_same_query!(
    app_tokens,
    command_events,
    commands,
    device_credentials,
    devices,
    reading_conflicts,
    reading_ids,
    readings,
);
