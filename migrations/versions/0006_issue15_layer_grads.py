"""issue 15: each epoch's gradient norm per linear layer (vanishing gradients, layer by layer)

Revision ID: 0006_issue15
Revises: 0005_issue18
Create Date: 2026-12-02 01:45:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0006_issue15'
down_revision = '0005_issue18'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('epoch_metrics', schema=None) as batch_op:
        batch_op.add_column(sa.Column('layer_grad_norms', sa.JSON(), nullable=True,
                                      comment="L2 norm of each linear layer's gradient at grad_norm's step, "
                                              "first layer first"))


def downgrade() -> None:
    with op.batch_alter_table('epoch_metrics', schema=None) as batch_op:
        batch_op.drop_column('layer_grad_norms')
