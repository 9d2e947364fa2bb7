"""issue 18: who cancelled and who re-queued an experiment (the signed-in dashboard user or the CLI's)

Revision ID: 0005_issue18
Revises: 0004_13b
Create Date: 2026-12-01 23:20:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0005_issue18'
down_revision = '0004_13b'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cancelled_by', sa.String(length=200), nullable=True,
                                      comment='who last cancelled it'))
        batch_op.add_column(sa.Column('requeued_by', sa.String(length=200), nullable=True,
                                      comment='who last re-queued its trials'))


def downgrade() -> None:
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.drop_column('requeued_by')
        batch_op.drop_column('cancelled_by')
