-- examples/accounts.sql: bank accounts, a domain declared in SQL only.
--
-- Run as a member of cqrs_admin that owns (or may write) schema bank.
-- Commands: OPEN_ACCOUNT {"holder"}, DEPOSIT {"amount"}, WITHDRAW
-- {"amount"}, CLOSE_ACCOUNT {}.  Two projections follow them:
--   bank.balance   one row per open account; a withdrawal larger than the
--                  balance is refused (dead-lettered), and closing an
--                  account deletes its row;
--   bank.activity  per account, what was deposited, withdrawn and refused.

CREATE SCHEMA bank;

-- Payloads, checked by cqrs.submit() before anything is written.
CREATE DOMAIN bank.holder AS text
	CHECK (VALUE <> '' AND pg_catalog.length(VALUE) <= 100);
CREATE DOMAIN bank.amount AS numeric(12, 2) NOT NULL CHECK (VALUE > 0);
CREATE TYPE bank.open_payload AS (holder bank.holder);
CREATE TYPE bank.amount_payload AS (amount bank.amount);
CREATE TYPE bank.close_payload AS ();

-- A rule the payload cannot state: a holder name is not a number.
CREATE FUNCTION bank.check_open(aggregate_id text, payload jsonb)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	IF payload->>'holder' ~ '^[0-9]+$' THEN
		RAISE EXCEPTION 'holder "%" is a number, not a name', payload->>'holder'
			USING ERRCODE = 'invalid_parameter_value';
	END IF;
END
$$;

SELECT cqrs.create_aggregate_type('account');
SELECT cqrs.create_command_type('OPEN_ACCOUNT', 'account', true,
	'bank.open_payload', 'bank.check_open(text, jsonb)');
SELECT cqrs.create_command_type('DEPOSIT', 'account', false, 'bank.amount_payload');
SELECT cqrs.create_command_type('WITHDRAW', 'account', false, 'bank.amount_payload');
SELECT cqrs.create_command_type('CLOSE_ACCOUNT', 'account', false, 'bank.close_payload');

-- Projection 1: the balance of each open account.
CREATE TABLE bank.balance (
	account_id text PRIMARY KEY,
	holder text NOT NULL,
	balance numeric(12, 2) NOT NULL CHECK (balance >= 0),
	opened_at timestamptz NOT NULL,
	updated_at timestamptz NOT NULL
);

CREATE FUNCTION bank.apply_balance(state bank.balance, command cqrs.command_log)
RETURNS bank.balance LANGUAGE plpgsql AS $$
DECLARE
	amount numeric := (command.payload->>'amount')::numeric;
BEGIN
	CASE command.command_type
	WHEN 'OPEN_ACCOUNT' THEN
		state := ROW(command.aggregate_id, command.payload->>'holder', 0,
					 command.created_at, command.created_at);
	WHEN 'DEPOSIT' THEN
		state.balance := state.balance + amount;
	WHEN 'WITHDRAW' THEN
		IF amount > state.balance THEN
			RAISE EXCEPTION 'insufficient funds: balance %, withdrawal %',
				state.balance, amount
				USING ERRCODE = 'check_violation';
		END IF;
		state.balance := state.balance - amount;
	WHEN 'CLOSE_ACCOUNT' THEN
		RETURN NULL;			-- the row goes
	END CASE;
	state.updated_at := command.created_at;
	RETURN state;
END
$$;

SELECT cqrs.create_projection('account_balance', 'account', 'bank.balance',
	'account_id', 'bank.apply_balance(bank.balance, cqrs.command_log)');

-- Projection 2: what happened to each account, refusals included.
CREATE TABLE bank.activity (
	account_id text PRIMARY KEY,
	balance numeric(12, 2) NOT NULL,
	deposited numeric(12, 2) NOT NULL,
	withdrawn numeric(12, 2) NOT NULL,
	refused integer NOT NULL,
	closed boolean NOT NULL
);

CREATE FUNCTION bank.apply_activity(state bank.activity, command cqrs.command_log)
RETURNS bank.activity LANGUAGE plpgsql AS $$
DECLARE
	amount numeric := (command.payload->>'amount')::numeric;
BEGIN
	CASE command.command_type
	WHEN 'OPEN_ACCOUNT' THEN
		state := ROW(command.aggregate_id, 0, 0, 0, 0, false);
	WHEN 'DEPOSIT' THEN
		state.balance := state.balance + amount;
		state.deposited := state.deposited + amount;
	WHEN 'WITHDRAW' THEN
		IF amount > state.balance THEN
			state.refused := state.refused + 1;
		ELSE
			state.balance := state.balance - amount;
			state.withdrawn := state.withdrawn + amount;
		END IF;
	WHEN 'CLOSE_ACCOUNT' THEN
		state.closed := true;
	END CASE;
	RETURN state;
END
$$;

SELECT cqrs.create_projection('account_activity', 'account', 'bank.activity',
	'account_id', 'bank.apply_activity(bank.activity, cqrs.command_log)');
