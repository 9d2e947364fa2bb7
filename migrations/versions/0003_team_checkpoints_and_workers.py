"""team, checkpoints and workers

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 15:14:04.170525
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('workers',
    sa.Column('name', sa.String(length=200), nullable=False, comment='Celery node name, e.g. cpu1@host'),
    sa.Column('host', sa.String(length=200), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('queues', sa.JSON(), nullable=False),
    sa.Column('device', sa.String(length=200), nullable=False, comment="cpu, or cuda and the GPU's name"),
    sa.Column('torch_version', sa.String(length=64), nullable=True),
    sa.Column('concurrency', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False, comment='online, stopped or lost'),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('stopped_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_workers'))
    )
    op.create_table('trial_checkpoints',
    sa.Column('trial_id', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False, comment='the attempt that wrote it'),
    sa.Column('epoch', sa.Integer(), nullable=False, comment='last epoch whose metrics it includes'),
    sa.Column('data', sa.LargeBinary(), nullable=True),
    sa.Column('location', sa.String(length=1000), nullable=True, comment='where the bytes are, when not in data'),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['trial_id'], ['trials.id'], name=op.f('fk_trial_checkpoints_trial_id_trials'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('trial_id', name=op.f('pk_trial_checkpoints'))
    )
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tags', sa.JSON(), nullable=False, server_default=sa.text("'[]'"),
                                      comment='short labels to find it by'))
        batch_op.add_column(sa.Column('note', sa.Text(), nullable=True, comment='free text from the submitter'))



def downgrade() -> None:
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.drop_column('note')
        batch_op.drop_column('tags')

    op.drop_table('trial_checkpoints')
    op.drop_table('workers')
