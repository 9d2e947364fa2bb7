"""training engine: regression metrics, norms, verdicts, artifacts, datasets

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 14:18:37.316703
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('datasets',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=300), nullable=False, comment='file name as first submitted'),
    sa.Column('n_rows', sa.Integer(), nullable=False),
    sa.Column('n_columns', sa.Integer(), nullable=False),
    sa.Column('columns', sa.JSON(), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False, comment='size of the original file'),
    sa.Column('content', sa.LargeBinary(), nullable=False, comment="the file's bytes, gzip-compressed"),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('sha256', name=op.f('pk_datasets'))
    )
    op.create_table('trial_artifacts',
    sa.Column('trial_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False, comment='curve_1d or boundary_2d'),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['trial_id'], ['trials.id'], name=op.f('fk_trial_artifacts_trial_id_trials'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('trial_id', 'kind', name=op.f('pk_trial_artifacts'))
    )
    with op.batch_alter_table('epoch_metrics', schema=None) as batch_op:
        batch_op.add_column(sa.Column('train_rmse', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('val_rmse', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('train_mae', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('val_mae', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('train_r2', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('val_r2', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('grad_norm', sa.Float(), nullable=True, comment="L2 norm of the last step's gradient"))
        batch_op.add_column(sa.Column('weight_norm', sa.Float(), nullable=True, comment='L2 norm of all weights at epoch end'))

    with op.batch_alter_table('trials', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parameter_count', sa.Integer(), nullable=True, comment='the x-axis of capacity plots'))
        batch_op.add_column(sa.Column('verdict', sa.String(length=16), nullable=True, comment='fit diagnosis: underfit, overfit, good_fit, diverged, not_converged'))
        batch_op.add_column(sa.Column('diagnosis', sa.JSON(), nullable=True, comment='the numbers that decided the verdict'))




def downgrade() -> None:

    with op.batch_alter_table('trials', schema=None) as batch_op:
        batch_op.drop_column('diagnosis')
        batch_op.drop_column('verdict')
        batch_op.drop_column('parameter_count')

    with op.batch_alter_table('epoch_metrics', schema=None) as batch_op:
        batch_op.drop_column('weight_norm')
        batch_op.drop_column('grad_norm')
        batch_op.drop_column('val_r2')
        batch_op.drop_column('train_r2')
        batch_op.drop_column('val_mae')
        batch_op.drop_column('train_mae')
        batch_op.drop_column('val_rmse')
        batch_op.drop_column('train_rmse')

    op.drop_table('trial_artifacts')
    op.drop_table('datasets')

