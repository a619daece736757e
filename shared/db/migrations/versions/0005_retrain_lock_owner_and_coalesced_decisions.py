"""The retrain lock names its chain; held-back retrain decisions are coalesced

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 21:35:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('policy_lock', schema=None) as batch_op:
        batch_op.add_column(sa.Column('task_id', sa.String(length=64), nullable=True))

    with op.batch_alter_table('retrain_decision', schema=None) as batch_op:
        batch_op.add_column(sa.Column('count', sa.Integer(), server_default=sa.text('1'),
                                      nullable=False))
        batch_op.add_column(sa.Column('last_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('held_by', sa.String(length=64), nullable=True))
    op.execute("UPDATE retrain_decision SET last_at = created_at")
    with op.batch_alter_table('retrain_decision', schema=None) as batch_op:
        batch_op.alter_column('last_at', existing_type=sa.DateTime(timezone=True),
                              nullable=False, server_default=sa.text('(CURRENT_TIMESTAMP)'))
        # One held-back row per rule, action and running retrain: the coalescing key.
        batch_op.create_index('uq_retrain_decision_held', ['rule', 'action', 'held_by'],
                              unique=True, postgresql_where=sa.text('held_by IS NOT NULL'),
                              sqlite_where=sa.text('held_by IS NOT NULL'))


def downgrade() -> None:
    with op.batch_alter_table('retrain_decision', schema=None) as batch_op:
        batch_op.drop_index('uq_retrain_decision_held')
        batch_op.drop_column('held_by')
        batch_op.drop_column('last_at')
        batch_op.drop_column('count')
    with op.batch_alter_table('policy_lock', schema=None) as batch_op:
        batch_op.drop_column('task_id')
