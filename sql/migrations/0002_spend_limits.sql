-- 0002: spend limits. A limit belongs to an organization; a row with user_id NULL is the default
-- for every user of that organization, a row with a user_id overrides it for that user. Spend is
-- the sum of cost_micros of the user's assistant messages in chats of that organization since
-- the start of the current period (UTC), so a limit never bleeds across organizations.
CREATE TABLE spend_limits (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    user_id         uuid REFERENCES users (id) ON DELETE CASCADE,
    limit_micros    bigint NOT NULL CHECK (limit_micros >= 0),
    period          text NOT NULL DEFAULT 'month' CHECK (period IN ('day', 'week', 'month')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (organization_id, user_id)
);

-- Spend over a period reads a user's chats in an organization, then their messages since the
-- period start; this index serves the first half (chat_messages_chat_id_idx the second).
CREATE INDEX chats_org_owner_idx ON chats (organization_id, owner_id);
